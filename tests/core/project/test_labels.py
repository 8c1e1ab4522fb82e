"""Label versions (al_core.project.labels): corrections as new versions, history and revert, one transaction per
edit with conflicts detected, and reviews keyed by slide region so they survive a rebuilt grid. Each runs on the
project's SQLite file and on PostgreSQL (``db_url``)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from shapely.geometry import Point, Polygon, box
from sqlalchemy import select

from al_core import GridSpec, LabelError, Project
from al_core.project.labels import Annotation, LabelConflictError
from al_core.project.schema import ReviewRow

SLIDE = "CMU-1-Small-Region"


@pytest.fixture()
def project(tmp_path, sample_svs, db_url):
    proj = Project.create(tmp_path / "p", ["Epithelium:#c80000", "Stroma:#00a000", "Ignore:#808080:ignore"],
                          db_url=db_url)
    proj.add_slide(sample_svs)
    yield proj
    proj.close()


@pytest.fixture()
def labelled(project, sample_geojson):
    """The sample's pre-annotation imported (version 1); its second polygon spans most of the slide."""
    project.import_labels(sample_geojson)
    return project


def _big(project) -> Polygon:
    return max((a.geometry for a in project.annotations(SLIDE)), key=lambda g: g.area)


def _mask(project, region, version=None):
    """The label mask of a level-0 box at full resolution (a stand-in patch row)."""
    from types import SimpleNamespace

    x0, y0, x1, y1 = (int(v) for v in region.bounds)
    patch = SimpleNamespace(slide_id=1, x=x0, y=y0, size=x1 - x0, patch=x1 - x0, downsample=1.0)
    return project.labels.mask(patch, version)


def test_correction_is_a_new_version_and_history_is_kept(project, sample_geojson):
    project.import_labels(sample_geojson)
    project.build_grid(GridSpec(patch=256, overlap=0, min_tissue=0.5))
    patch = project.patches()[0]
    region = box(patch.x, patch.y, patch.x + patch.size, patch.y + patch.size)
    before = project.label_mask(patch)
    v = project.correct(SLIDE, region, 2, author="dr-a", patch_id=patch.id)
    assert v == 2
    after = project.label_mask(patch)
    assert (after == 2).all()
    assert np.array_equal(project.label_mask(patch, version=1), before)
    v = project.correct(SLIDE, region, None, author="dr-a", patch_id=patch.id)
    assert (project.label_mask(patch) == 0).all()
    assert patch.id in project.labelled_patch_ids()  # reviewed: background is a label too
    with pytest.raises(LabelError, match="outside the slide"):
        project.correct(SLIDE, Polygon([(9000, 9000), (9100, 9000), (9100, 9100)]), 1, author="x")
    assert project.label_version(SLIDE) == v


def test_annotations_are_named_tuples(labelled):
    anns = labelled.annotations(SLIDE)
    assert len(anns) == 6 and all(isinstance(a, Annotation) for a in anns)
    first = anns[0]
    ann_id, cls, geom = first  # tuple-unpacking still works
    assert (ann_id, cls, geom) == (first.id, first.class_idx, first.geometry) and cls == 1
    assert [a.id for a in anns] == sorted(a.id for a in anns)  # oldest first
    # only those whose bounding box meets a region
    x0, y0, x1, y1 = first.geometry.bounds
    assert first in labelled.annotations(SLIDE, region=(x0, y0, x1, y1))
    assert labelled.annotations(SLIDE, region=(0, 0, 10, 10)) == []


def test_unknown_class_is_refused(labelled):
    with pytest.raises(LabelError, match="unknown class index 7"):
        labelled.correct(SLIDE, box(0, 0, 50, 50), 7, author="x")
    assert labelled.label_version(SLIDE) == 1


def test_history_and_revert(labelled):
    big = _big(labelled)
    region = box(*big.centroid.buffer(150).bounds)
    v1 = _mask(labelled, region)
    assert 0 < (v1 == 1).mean() < 1  # the region has both label and background
    assert labelled.correct(SLIDE, region, 2, author="dr-a") == 2
    assert (_mask(labelled, region) == 2).all()
    assert labelled.labels.revert(1, region, 1, author="dr-b") == 3
    assert np.array_equal(_mask(labelled, region), v1)
    assert (_mask(labelled, region, version=2) == 2).all()  # older versions stay readable
    hist = labelled.labels.history(1)
    assert [(h.version, h.author, h.message) for h in hist] == [
        (1, "import", "import"), (2, "dr-a", "correction"), (3, "dr-b", "revert to version 1")]
    assert hist[0].source.endswith("preannotation.geojson") and all(h.created_at for h in hist)


def test_edit_replaces_only_inside_its_region(labelled):
    big = _big(labelled)
    cx, cy = (int(v) for v in big.centroid.coords[0])
    region = box(cx - 100, cy - 100, cx + 100, cy + 100)
    around = box(cx - 300, cy - 300, cx + 300, cy + 300)
    before = _mask(labelled, around)
    # the new shape is bigger than the region: it is clipped to it
    v = labelled.labels.edit(1, region, [(2, box(cx - 250, cy - 250, cx + 250, cy + 250))], author="t",
                             message="paste", action="paint")
    after = _mask(labelled, around)
    inside = np.zeros(after.shape, bool)
    inside[200:400, 200:400] = True
    assert (after[inside] == 2).all()
    assert np.array_equal(after[~inside], before[~inside])
    # the polygons the region cut were retired, their rest re-added: the history keeps the old ones whole
    assert labelled.label_version(SLIDE) == v == 2
    assert any(a.geometry.equals(big) for a in labelled.annotations(SLIDE, version=1))
    assert not any(a.geometry.equals(big) for a in labelled.annotations(SLIDE))


def test_stale_edit_of_a_changed_region_is_a_conflict(labelled):
    labelled.build_grid(GridSpec(patch=256, overlap=0, min_tissue=0.5))
    patch = labelled.patches()[0]
    region = box(patch.x, patch.y, patch.x + patch.size, patch.y + patch.size)
    base = labelled.label_version(SLIDE)
    assert labelled.correct(SLIDE, region, 2, author="dr-a", base_version=base, patch_id=patch.id) == 2
    with labelled.store.read() as s:
        reviews = len(s.scalars(select(ReviewRow)).all())
    # dr-b drew on version 1 too, over part of the same patch
    overlap = box(patch.x + 10, patch.y + 10, patch.x + 100, patch.y + 100)
    with pytest.raises(LabelConflictError, match=r"changed by dr-a after you started \(version 1\)") as err:
        labelled.correct(SLIDE, overlap, 1, author="dr-b", base_version=base, patch_id=patch.id)
    assert isinstance(err.value, LabelError)
    # the refused edit left nothing behind: no version, no review, dr-a's labels intact
    assert labelled.label_version(SLIDE) == 2
    with labelled.store.read() as s:
        assert len(s.scalars(select(ReviewRow)).all()) == reviews
    assert (labelled.label_mask(patch) == 2).all()
    # drawn on the current version (or without a base version) the same edit goes in
    assert labelled.correct(SLIDE, overlap, 1, author="dr-b", base_version=2) == 3
    assert labelled.correct(SLIDE, overlap, None, author="script") == 4


def test_disjoint_edits_drawn_on_the_same_version_are_both_kept(labelled):
    """Two reviewers correct different places of the same big polygon, both starting from version 1."""
    big = _big(labelled)
    x0, y0, x1, y1 = (int(v) for v in big.bounds)
    inside = [(x, y) for y in range(y0, y1, 50) for x in range(x0, x1, 50) if big.contains(Point(x, y))]
    a, b = (box(x - 50, y - 50, x + 50, y + 50) for x, y in (inside[0], inside[-1]))
    assert not a.intersects(b)
    assert labelled.correct(SLIDE, a, 2, author="dr-a", base_version=1) == 2
    assert labelled.correct(SLIDE, b, 2, author="dr-b", base_version=1) == 3
    assert (_mask(labelled, a) == 2).all() and (_mask(labelled, b) == 2).all()


def test_an_edit_that_left_the_region_as_it_was_is_no_conflict(labelled):
    big = _big(labelled)
    cx, cy = (int(v) for v in big.representative_point().coords[0])
    inner = box(cx - 5, cy - 5, cx + 5, cy + 5)
    assert inner.within(big)
    # dr-a paints epithelium where epithelium already is: a new version, but the region shows the same
    labelled.correct(SLIDE, inner.buffer(20), 1, author="dr-a", base_version=1)
    assert labelled.correct(SLIDE, inner, 2, author="dr-b", base_version=1) == 3


def test_concurrent_corrections_all_land_one_version_each(labelled, tmp_path):
    """Two annotators (own connections, threads) save 8 corrections each at once, each on the version it read."""
    big = _big(labelled)
    x0, y0, x1, y1 = (int(v) for v in big.bounds)
    regions = {tag: [box(x0 + 60 * i, y0 + 700 * k, x0 + 60 * i + 40, y0 + 700 * k + 40) for i in range(8)]
               for k, tag in enumerate(("dr-a", "dr-b"))}
    errors: list[BaseException] = []

    def annotate(tag: str) -> None:
        try:
            with Project.open(labelled.root, db_url=labelled.store.url) as proj:  # its own connections
                for r in regions[tag]:
                    proj.correct(SLIDE, r, 2, author=tag, base_version=proj.label_version(SLIDE))
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=annotate, args=(t,)) for t in regions]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    hist = labelled.labels.history(1)
    assert [h.version for h in hist] == list(range(1, 18))
    assert sorted(h.author for h in hist[1:]) == ["dr-a"] * 8 + ["dr-b"] * 8
    for rs in regions.values():
        for r in rs:
            assert (_mask(labelled, r) == 2).all()


def test_reviews_are_keyed_by_region_and_survive_a_rebuilt_grid(labelled):
    spec = GridSpec(patch=256, overlap=0, min_tissue=0.0)
    labelled.build_grid(spec)
    by_pos = {(p.x, p.y): p for p in labelled.patches()}
    glass = by_pos[(0, 0)]  # no label touches the corner: reviewed, it is labelled background
    assert glass.id not in labelled.labelled_patch_ids()
    labelled.mark_reviewed(glass.id, author="dr-a")
    assert labelled.label_version(SLIDE) == 1  # a review is not a label version
    painted = by_pos[(glass.size, 0)]
    labelled.correct(SLIDE, box(painted.x, painted.y, painted.x + 50, painted.y + 50), 2, author="dr-a",
                     patch_id=painted.id)
    assert labelled.reviewed_patch_ids() == {glass.id, painted.id}
    assert {glass.id, painted.id} <= labelled.labelled_patch_ids()
    with labelled.store.read() as s:
        rows = s.scalars(select(ReviewRow).order_by(ReviewRow.id)).all()
    assert [(r.slide_id, r.x, r.y, r.size, r.action, r.label_version) for r in rows] == [
        (1, 0, 0, glass.size, "reviewed", 1), (1, glass.size, 0, glass.size, "paint", 2)]

    # the same grid again: new patch rows, the same regions, still reviewed
    labelled.build_grid(spec)
    again = {(p.x, p.y): p for p in labelled.patches()}
    assert again[(0, 0)].id != glass.id
    assert labelled.reviewed_patch_ids() == {again[(0, 0)].id, again[(glass.size, 0)].id}
    assert again[(0, 0)].id in labelled.labelled_patch_ids()
    assert labelled.reviewed_patch_ids(SLIDE) == labelled.reviewed_patch_ids()

    # a coarser grid: its patch counts as reviewed only once reviewers saw all of it
    labelled.build_grid(GridSpec(patch=512, overlap=0, min_tissue=0.0))
    coarse = next(p for p in labelled.patches() if (p.x, p.y) == (0, 0))
    assert coarse.size == 2 * glass.size and labelled.reviewed_patch_ids() == set()
    labelled.build_grid(spec)
    fine = {(p.x, p.y): p for p in labelled.patches()}
    for pos in ((0, glass.size), (glass.size, glass.size)):
        labelled.mark_reviewed(fine[pos].id, author="dr-b")
    labelled.build_grid(GridSpec(patch=512, overlap=0, min_tissue=0.0))
    coarse = next(p for p in labelled.patches() if (p.x, p.y) == (0, 0))
    assert coarse.id in labelled.reviewed_patch_ids()
