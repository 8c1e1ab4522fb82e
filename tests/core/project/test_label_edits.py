"""The reviewer's label operations (al_core.project.label_edits) and the Project methods that save them: brush,
class-aware eraser, wand, editing saved polygons, and undo/redo across saves as label versions."""

from __future__ import annotations

import math

import numpy as np
import pytest
from shapely.geometry import Point, box

from al_core import GridSpec, LabelError, Project
from al_core.project.label_edits import (
    EditHistory,
    annotation_at,
    brush_region,
    class_areas,
    combine,
    erase,
    paint,
    step_brush,
    wand_at,
    wand_mask,
    wand_region,
)

SLIDE = "CMU-1-Small-Region"


@pytest.fixture()
def project(tmp_path, sample_svs):
    proj = Project.create(tmp_path / "p", ["Epithelium:#c80000", "Stroma:#00a000"])
    proj.add_slide(sample_svs)
    proj.build_grid(GridSpec(patch=256, overlap=0, min_tissue=0.0))
    yield proj
    proj.close()


def _areas(project, region, version=None):
    shapes = [(a.class_idx, a.geometry.intersection(region))
              for a in project.annotations(SLIDE, version, region.bounds)]
    return class_areas(shapes)


def test_brush_radius_is_in_micrometres():
    dot = brush_region([(100, 100)], radius_um=5, mpp=0.5)  # 10 px radius
    assert dot.area == pytest.approx(math.pi * 100, rel=0.01)
    stroke = brush_region([(0, 0), (200, 0)], radius_um=5, mpp=0.5)
    assert stroke.area == pytest.approx(200 * 20 + math.pi * 100, rel=0.01)
    assert brush_region([(0, 0)], 5, None).area == pytest.approx(math.pi * 25, rel=0.01)  # no scale: px
    with pytest.raises(ValueError, match="positive"):
        brush_region([(0, 0)], 0, 0.5)
    with pytest.raises(ValueError, match="one point"):
        brush_region([], 5, 0.5)


def test_brush_steps_clamp_at_the_ends():
    assert step_brush(5, +1) == 8
    assert step_brush(5, -1) == 3
    assert step_brush(2, -3) == 2
    assert step_brush(120, +1) == 120
    assert step_brush(6.1, 0) == 5  # an odd size snaps to the nearest notch


def test_paint_and_class_aware_erase_are_pure_and_exact():
    shapes = [(1, box(0, 0, 100, 100)), (2, box(100, 0, 200, 100))]
    stroke = box(50, 0, 150, 100)
    painted = paint(shapes, stroke, 2)
    assert class_areas(painted) == {1: pytest.approx(5000), 2: pytest.approx(15000)}
    assert class_areas(paint(shapes, stroke, 0)) == {1: pytest.approx(5000), 2: pytest.approx(5000)}
    only_one = erase(shapes, stroke, class_idx=1)
    assert class_areas(only_one) == {1: pytest.approx(5000), 2: pytest.approx(10000)}
    assert shapes[0][1].area == 10000  # the input is untouched


def test_combine_selection_add_and_subtract():
    a, b = box(0, 0, 10, 10), box(5, 0, 15, 10)
    assert combine(None, a, "replace").area == 100
    assert combine(a, b, "add").area == 150
    assert combine(a, b, "subtract").area == 50
    assert combine(a, b, "replace").equals(b)
    assert combine(None, a, "subtract").is_empty


def test_brush_saves_one_version_with_the_stroke_area_and_class(project):
    mpp = project.slide_row(SLIDE).mpp
    stroke = brush_region([(400, 400), (600, 450), (700, 600)], radius_um=10, mpp=mpp)
    v = project.correct(SLIDE, stroke, 1, author="dr-a")
    assert v == project.label_version(SLIDE) == 1
    assert _areas(project, box(0, 0, 2000, 2000)) == {1: pytest.approx(stroke.area, rel=1e-6)}
    # a second stroke of another class over part of it: that part changes class, nothing else
    over = brush_region([(600, 300), (600, 700)], radius_um=10, mpp=mpp)
    project.correct(SLIDE, over, 2, author="dr-a")
    areas = _areas(project, box(0, 0, 2000, 2000))
    assert areas[2] == pytest.approx(over.area, rel=1e-6)
    assert areas[1] == pytest.approx(stroke.difference(over).area, rel=1e-6)
    # the class-aware eraser over both removes only class 1
    rub = box(0, 0, 2000, 2000)
    v3 = project.erase(SLIDE, rub, class_idx=1, author="dr-a")
    assert v3 == 3
    assert _areas(project, rub) == {2: pytest.approx(over.area, rel=1e-6)}
    assert _areas(project, rub, version=2)[1] > 0  # history keeps what was erased


def test_wand_follows_colour_edges():
    rgb = np.zeros((60, 80, 3), dtype=np.uint8)
    rgb[:] = (235, 200, 220)  # pale pink stroma
    rgb[10:40, 20:50] = (90, 40, 130)  # a purple nucleus-dense block
    rgb[20:25, 30:35] = (240, 240, 240)  # a hole inside it: belongs to the clicked region
    mask = wand_mask(rgb, (25, 15), tolerance=10)
    # the light blur (against texture) may cost the 1-px rim of a razor-sharp synthetic edge, never more
    assert 28 * 28 <= mask.sum() <= 30 * 30 and not mask[:10].any() and not mask[:, 50:].any()
    assert mask[22, 32]
    geom = wand_region(rgb, (25, 15), origin=(1000, 2000), downsample=4, tolerance=10)
    assert geom.area == pytest.approx(mask.sum() * 16, rel=0.02)
    assert geom.bounds == pytest.approx((1000 + 20 * 4, 2000 + 10 * 4, 1000 + 50 * 4, 2000 + 40 * 4), abs=8)
    big = wand_mask(rgb, (2, 2), tolerance=10)  # the background around it, not the block
    assert not big[15, 25] and 60 * 80 - 32 * 32 <= big.sum() <= 60 * 80 - 30 * 30
    with pytest.raises(ValueError, match="outside"):
        wand_mask(rgb, (80, 0))


def test_wand_on_the_real_slide_stays_local_and_grows_with_tolerance(project):
    with project.open_slide(SLIDE) as slide:
        x, y = 1100, 1500
        small = wand_at(slide, x, y, downsample=2, tolerance=6)
        large = wand_at(slide, x, y, downsample=2, tolerance=25)
    assert small.covers(Point(x, y)) or small.distance(Point(x, y)) < 4
    assert 0 < small.area <= large.area
    assert large.area <= (384 * 2) ** 2  # never beyond the window read at that zoom


def test_edit_saved_polygons_delete_reclass_reshape(project):
    project.correct(SLIDE, box(100, 100, 300, 300), 1, author="a")
    project.correct(SLIDE, box(500, 100, 700, 300), 1, author="a")
    anns = project.annotations(SLIDE)
    ids = [(a.id, a.class_idx, a.geometry) for a in anns]
    first = annotation_at(ids, 200, 200)
    second = annotation_at(ids, 600, 200)
    assert first is not None and second is not None and annotation_at(ids, 400, 200) is None

    v = project.edit_annotation(SLIDE, first, class_idx=2, author="b")
    assert _areas(project, box(0, 0, 800, 400)) == {1: pytest.approx(40000), 2: pytest.approx(40000)}
    v2 = project.edit_annotation(SLIDE, second, geometry=box(500, 100, 800, 300), author="b")
    assert _areas(project, box(0, 0, 900, 400))[1] == pytest.approx(60000)
    new_second = annotation_at([(a.id, a.class_idx, a.geometry) for a in project.annotations(SLIDE)], 750, 200)
    assert new_second is not None
    v3 = project.edit_annotation(SLIDE, new_second, delete=True, author="b")
    assert (v, v2, v3) == (3, 4, 5)
    assert _areas(project, box(0, 0, 900, 400)) == {2: pytest.approx(40000)}
    assert _areas(project, box(0, 0, 900, 400), version=2) == {1: pytest.approx(80000)}
    with pytest.raises(LabelError, match="not in the current labels"):
        project.edit_annotation(SLIDE, second, delete=True)  # retired by the reshape
    with pytest.raises(LabelError, match="unknown class"):
        project.edit_annotation(SLIDE, first, class_idx=7)


def test_undo_and_redo_across_saves_are_versions(project):
    patch = project.patches()[5]
    region = box(patch.x, patch.y, patch.x + patch.size, patch.y + patch.size)
    history = EditHistory()
    inner = box(patch.x + 10, patch.y + 10, patch.x + 110, patch.y + 110)
    before = project.label_version(SLIDE)
    after = project.correct(SLIDE, inner, 1, author="a", patch_id=patch.id)
    history.record(region, before, after)
    assert _areas(project, region) == {1: pytest.approx(10000)}

    undo = history.undo()
    assert undo is not None
    v_undo = project.revert_patch(patch.id, undo[1], author="a", region=undo[0])
    assert v_undo == after + 1 and _areas(project, region) == {}
    redo = history.redo()
    assert redo is not None
    project.revert_patch(patch.id, redo[1], author="a", region=redo[0])
    assert _areas(project, region) == {1: pytest.approx(10000)}
    assert history.redo() is None
    # revert a patch straight to a version of its history
    project.revert_patch(patch.id, 0, author="a")
    assert _areas(project, region) == {}
    assert [h.message for h in project.labels.history(1)][-1] == "revert to version 0"
