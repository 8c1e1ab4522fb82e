"""The review app's state object against a real project (no browser): queue, drawing, saving, the model side."""

from __future__ import annotations

import io
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from shapely.geometry import box
from slideloop_apps.state import AppState, fit_zoom, patch_outline, server_base_url
from sqlalchemy import select

from al_core.project.project import Project
from al_core.project.schema import ReviewRow
from al_core.tiles.pyramid import Pyramid
from al_core.tiles.source import TileSource
from al_core.wsi.grid import GridSpec

SCALE = 16.0  # 2**zmax of the sample (2220 x 2967 px): map units → slide px


def _feature(points_px: list[tuple[float, float]]) -> dict:
    ring = [[x / SCALE, -y / SCALE] for x, y in points_px]
    return {"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [ring + ring[:1]]}}


@pytest.fixture
def state(tmp_path: Path, sample_svs: Path, sample_geojson: Path) -> Iterator[AppState]:
    with Project.create(tmp_path / "p") as proj:
        proj.add_slide(sample_svs)
        proj.build_grid(GridSpec(patch=256))
        proj.import_labels(sample_geojson)
        yield AppState(proj, author="tester")


def _reviews(proj: Project, patch_id: int) -> list[ReviewRow]:
    with proj.store.read() as s:
        return list(s.scalars(select(ReviewRow).where(ReviewRow.patch_id == patch_id)).all())


def test_without_a_model(state: AppState, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLIDELOOP_BASE_URL", "/user/bob")
    assert server_base_url() == "/user/bob/"
    assert state.model_id is None and "No model is trained yet" in state.model_note()
    assert set(state.tile_urls()) == {"slide", "labels"}
    assert state.tile_urls()["slide"] == "/user/bob/slideloop/tiles/1/{z}/{x}/{y}.jpeg"
    flags = [(q.reviewed, q.labelled) for q in state.queue]
    assert flags == sorted(flags) and len(flags) == len(state.project.patches())
    assert state.step(+1) == state.queue[0].patch_id and state.step(+1) == state.queue[1].patch_id
    assert state.step(-5) == state.queue[0].patch_id


def test_draw_and_save_a_correction(state: AppState) -> None:
    proj = state.project
    pid = state.step(+1)
    before = proj.label_version(1)
    state.mode = 1
    assert state.add_drawn(_feature([(100, 100), (300, 100), (300, 300), (100, 300)]))
    state.mode = 0
    assert state.add_drawn(_feature([(150, 150), (200, 150), (200, 200)]))
    state.undo()
    assert len(state.pending) == 1
    version = state.save()
    assert version == before + 1 and proj.label_version(1) == version
    assert state.pending == [] and "marked reviewed" in state.message
    assert [r.label_version for r in _reviews(proj, pid)] == [version]
    assert next(q for q in state.queue if q.patch_id == pid).reviewed
    assert state.queue[0].patch_id == pid  # the order stays put within a session: "next" goes on from here
    assert "v=1" in state.tile_urls()["labels"]
    mask = proj.label_mask(proj.patch(pid))
    assert mask.shape == (256, 256)


def test_an_edit_drawn_on_an_older_version_saves_unless_it_conflicts(state: AppState) -> None:
    """Someone else saved meanwhile: far away, the drawing saves; over the same region, it is refused and
    the drawing stays pending (nothing of either edit is lost)."""
    proj = state.project
    state.step(+1)
    state.mode = 1
    assert state.add_drawn(_feature([(100, 100), (300, 100), (300, 300), (100, 300)]))
    proj.correct(1, box(1500, 2500, 1600, 2600), 1, author="other")  # elsewhere on the slide
    version = state.save()
    assert version is not None and version == proj.label_version(1) and state.level == "info"

    assert state.add_drawn(_feature([(100, 100), (300, 100), (300, 300), (100, 300)]))
    theirs = proj.correct(1, box(150, 150, 250, 250), None, author="other")  # erased inside what I paint
    assert state.save() is None
    assert state.level == "error" and "Not saved" in state.message and "still on the map" in state.message
    assert len(state.pending) == 1 and proj.label_version(1) == theirs


def test_self_intersecting_polygon_is_repaired(state: AppState) -> None:
    bowtie = _feature([(400, 400), (600, 600), (600, 400), (400, 600)])
    assert state.add_drawn(bowtie)
    assert state.level == "warning" and "repaired" in state.message
    assert state.save() is not None
    geoms = [g for _, _, g in state.project.annotations(1, region=(400, 400, 600, 600))]
    assert all(g.is_valid for g in geoms)


@pytest.mark.parametrize("points", [
    [(-900, -900), (-500, -900), (-500, -500)],      # outside the slide
    [(10, 10), (20, 20), (30, 30)],                  # no area
])
def test_unusable_shape_is_refused_and_nothing_saved(state: AppState, points: list[tuple[float, float]]) -> None:
    before = state.project.label_version(1)
    assert not state.add_drawn(_feature(points))
    assert state.level == "error" and state.pending == []
    assert state.save() is None and state.project.label_version(1) == before


def test_shape_crossing_the_edge_is_clipped(state: AppState) -> None:
    assert state.add_drawn(_feature([(-100, -100), (50, -100), (50, 50), (-100, 50)]))
    (_, geom), = state.pending
    assert geom.bounds == (0.0, 0.0, 50.0, 50.0)


def test_map_helpers() -> None:
    pyr = Pyramid(2220, 2967)
    assert fit_zoom(pyr, 2967, 560) == 1.5 and fit_zoom(pyr, 256, 480) == 4.0 and fit_zoom(pyr, 10**7) == 0.0
    fc = patch_outline([], pyr)
    assert fc["features"] == []


# --- with a trained model (the model side: al_core.learn predict / rank) -----------------------------------


@pytest.fixture
def trained_copy(trained: tuple[Path, int], tmp_path: Path) -> tuple[Path, int]:
    """A copy of the session's trained project (conftest's ``trained``: tiny model, every patch predicted);
    accepting a prediction writes labels, so never the shared original."""
    root, model_id = trained
    shutil.copytree(root, tmp_path / "trained")
    return tmp_path / "trained", model_id


@pytest.mark.slow
def test_with_a_model(trained_copy: tuple[Path, int]) -> None:
    root, model_id = trained_copy
    with Project.open(root) as proj:
        state = AppState(proj, author="tester")
        assert state.model_id == model_id and state.has_predictions, state.model_problem
        assert "lowest IoU" in state.model_note() and "prediction" in state.tile_urls()
        assert f"/prediction/1/{model_id}/" in state.tile_urls()["prediction"]
        labelled = [q for q in state.queue if q.iou is not None]
        assert labelled and [q.iou for q in labelled] == sorted(q.iou for q in labelled)
        assert state.queue[: len(labelled)] == labelled  # worst IoU first, then the uncertain unlabelled
        assert all(q.uncertainty is not None for q in state.queue)

        tile = TileSource(proj).prediction_tile(1, model_id, 2, 0, 0)
        im = np.asarray(Image.open(io.BytesIO(tile)))
        assert im.shape == (256, 256, 4) and im[..., 3].any()  # predicted epithelium shows

        pid = state.step(+1)
        before = proj.label_version(1)
        version = state.accept_prediction()
        assert version == proj.label_version(1) == before + 1
        assert [r.action for r in _reviews(proj, pid)] == ["accept"]
        assert "Accepted the prediction" in state.message and f"patch {pid}" in state.message
        want = proj.predictions.classes(model_id, pid)
        got = proj.label_mask(proj.patch(pid))
        small = got[:: got.shape[0] // want.shape[0], :: got.shape[1] // want.shape[1]]
        assert (small == want).mean() > 0.95


@pytest.mark.slow
def test_accept_the_prediction_inside_a_brushed_region_only(trained_copy: tuple[Path, int]) -> None:
    from slideloop_apps.editing import Editor

    from al_core.project.label_edits import class_areas
    from al_core.wsi.raster import rasterize

    root, model_id = trained_copy
    with Project.open(root) as proj:
        state = AppState(proj, author="tester")
        editor = Editor(state, tool="accept")
        pid = state.step(+1)
        assert pid is not None
        patch = proj.patch(pid)
        y = patch.y + patch.size / 2
        assert editor.stroke([(patch.x + 20, y), (patch.x + patch.size - 20, y)])
        assert state.save() is not None, state.message
        region = state.history.done[-1][0]  # the stroke, as saved
        # outside the stroke nothing changed …
        rest = box(patch.x, patch.y, patch.x + patch.size, patch.y + patch.size).difference(region.buffer(1))
        now, then = proj.label_version(1), proj.label_version(1) - 1
        assert class_areas([(a.class_idx, a.geometry.intersection(rest)) for a in proj.annotations(1, now)]) == \
            pytest.approx(class_areas([(a.class_idx, a.geometry.intersection(rest)) for a in proj.annotations(1, then)]))
        # … inside it the label is the model's prediction
        got = proj.label_mask(patch)
        want = proj.predictions.classes(model_id, pid)
        up = np.kron(want, np.ones((got.shape[0] // want.shape[0],) * 2, dtype=np.uint8))
        inside = rasterize([(1, region.buffer(-2))], (patch.x, patch.y), patch.downsample,
                           (patch.patch, patch.patch)).astype(bool)
        assert inside.sum() > 100 and (got[inside] == up[inside]).mean() > 0.95


def test_an_edit_drawn_after_someone_saved_unseen_is_drawn_on_the_version_shown(state: AppState) -> None:
    """Another annotator saved over this patch after I opened it (my map does not show it): my shape there is
    refused, not painted over theirs; after the refusal the map shows their edit and a redrawn shape saves."""
    proj = state.project
    state.step(+1)
    theirs = proj.correct(1, box(150, 150, 250, 250), 1, author="other")
    state.mode = 1
    assert state.add_drawn(_feature([(100, 100), (300, 100), (300, 300), (100, 300)]))
    revision = state.revision
    assert state.save() is None and state.level == "error" and "other" in state.message
    assert len(state.pending) == 1 and proj.label_version(1) == theirs
    assert state.revision > revision and state.view_version == theirs  # the overlays refetch: theirs is shown
    state.undo()
    assert state.add_drawn(_feature([(100, 100), (300, 100), (300, 300), (100, 300)]))
    assert state.save() == theirs + 1


@pytest.mark.slow
def test_a_saved_correction_rescores_its_queue_row_and_marks_it_changed(trained_copy: tuple[Path, int]) -> None:
    from slideloop_apps.review import _queue_label

    root, _ = trained_copy
    with Project.open(root) as proj:
        state = AppState(proj, author="tester")
        assert not any(q.changed for q in state.queue)
        worst = state.queue[0]
        assert worst.iou is not None and worst.iou < 0.99 and not worst.changed
        assert state.step(+1) == worst.patch_id
        assert state.accept_prediction() is not None
        row = next(q for q in state.queue if q.patch_id == worst.patch_id)
        # scored against the new label at once (it is the stored prediction now), and marked as changed
        assert row.iou == pytest.approx(1.0, abs=0.02) and row.changed and row.reviewed
        assert "Δ" in _queue_label(row) and "Δ" not in _queue_label(state.queue[1])
        state.refresh_queue()
        assert state.queue[0].patch_id != worst.patch_id  # a fresh queue ranks it by its new score
        ranked = [q.iou for q in state.queue if q.iou is not None]
        assert ranked == sorted(ranked)

        # a drawn correction: the next patch painted all one class, the one it mostly is not
        nxt = state.queue[0]
        patch = state.select_patch(nxt.patch_id)
        mode = 1 if proj.label_mask(patch).mean() < 0.5 else 0
        assert state.add_region(mode, box(patch.x, patch.y, patch.x + patch.size, patch.y + patch.size))
        assert state.save() is not None, state.message
        now = next(q for q in state.queue if q.patch_id == nxt.patch_id)
        assert now.changed and now.iou is not None and now.iou != pytest.approx(nxt.iou, abs=1e-3)
        changed = {q.patch_id for q in state.queue if q.changed}
        assert {worst.patch_id, nxt.patch_id} <= changed
        # any other marked patch is a neighbour whose (overlapping) square the edits reached
        edited = [proj.patch(i) for i in (worst.patch_id, nxt.patch_id)]
        squares = [box(p.x, p.y, p.x + p.size, p.y + p.size) for p in edited]
        for q in state.queue:
            if q.changed and q.patch_id not in (worst.patch_id, nxt.patch_id):
                assert any(box(q.x, q.y, q.x + q.size, q.y + q.size).intersection(sq).area > 0 for sq in squares)
