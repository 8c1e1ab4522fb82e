"""The Rounds view's core: corrections per round counted from the store, validation figures, per-slide IoU,
delta against the previous round and which model became active, on a real tiny project and on plain facts."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _engine import FAST, clone
from shapely.geometry import box

from al_core.learn.metrics import scores
from al_core.learn.predict import predict
from al_core.learn.rounds import (
    ModelFacts,
    Review,
    build_rounds,
    corrections_after,
    pending_corrections,
    project_rounds,
)
from al_core.learn.train import train
from al_core.project.schema import ModelRow, PatchScoreRow


def _facts(mid: int, created: str, lv: dict[int, int], iou: float | None, **kw) -> ModelFacts:
    return ModelFacts(id=mid, parent_id=kw.get("parent"), status="done", created_at=created, finished_at=created,
                      label_versions=lv, train_patches=kw.get("train", 10), val_patches=2,
                      class_names=["Background", "Epithelium"], val_iou=[0.9, iou] if iou is not None else None,
                      val_dice=None, val_macro_iou=None if iou is None else (0.9 + iou) / 2, val_macro_dice=None)


def test_corrections_are_counted_by_label_version_and_reviews_by_time() -> None:
    models = [_facts(1, "2026-01-01T10:00:00+00:00", {1: 1, 2: 1}, 0.5),
              _facts(2, "2026-01-01T11:00:00+00:00", {1: 4, 2: 2}, 0.7, parent=1),
              _facts(3, "2026-01-01T12:00:00+00:00", {1: 4, 2: 2}, None, parent=2)]
    reviews = [
        Review(1, (1, 0, 0, 256), 2, "paint", "2026-01-01T10:10:00+00:00"),
        Review(1, (1, 0, 0, 256), 3, "erase", "2026-01-01T10:11:00+00:00"),  # the same patch again: one correction
        Review(1, (1, 256, 0, 256), 4, "accept", "2026-01-01T10:12:00+00:00"),
        Review(2, (2, 0, 0, 256), 2, "paint", "2026-01-01T10:13:00+00:00"),
        Review(2, (2, 256, 0, 256), 2, "reviewed", "2026-01-01T10:14:00+00:00"),  # kept as it was
        Review(2, (2, 512, 0, 256), 2, "reviewed", "2026-01-01T11:30:00+00:00"),  # after model 2 started
        Review(2, (2, 768, 0, 256), 2, "reviewed", "2026-01-01T11:00:00+00:00"),  # the second model 2 started
        Review(1, (1, 512, 0, 256), 5, "paint", "2026-01-01T11:31:00+00:00"),  # after model 3 started: no round yet
    ]
    r1, r2, r3 = build_rounds(models, reviews, activated={1, 2}, active_id=2)
    assert (r1.corrections, r1.reviewed, r1.label_versions) == (0, 0, 2)
    assert (r2.corrections, r2.reviewed, r2.label_versions) == (3, 2, 4)
    assert (r3.corrections, r3.reviewed, r3.label_versions) == (0, 1, 0)
    assert r2.mean_iou == pytest.approx(0.8) and r2.delta_iou == pytest.approx(0.1) and r1.delta_iou is None
    assert r2.val_iou == {"Background": 0.9, "Epithelium": 0.7} and r2.val_dice == {}
    assert r3.mean_iou is None and r3.delta_iou is None  # no figure: no delta, not a fake 0
    assert [(r.promoted, r.active) for r in (r1, r2, r3)] == [(True, False), (True, True), (False, False)]
    assert json.loads(json.dumps(r3.to_dict()))["mean_iou"] is None
    # waiting for the next round: the edit saved after model 3 started; before any model, every edit
    assert corrections_after(models[-1], reviews) == 1 and corrections_after(None, reviews) == 4


def test_rounds_of_a_real_project(trained, tmp_path) -> None:
    root, mid = trained
    with clone(root, tmp_path / "p") as proj:
        slide = proj.slides()[0]
        labelled = sorted(proj.labelled_patch_ids())
        a, b, c, d = (proj.patch(p) for p in labelled[:4])
        for p in (a, b, c):  # three patches corrected, the first one twice
            proj.correct(slide.id, box(p.x, p.y, p.x + p.size / 2, p.y + p.size / 2), 1, patch_id=p.id, author="t")
        proj.correct(slide.id, box(a.x, a.y, a.x + a.size / 4, a.y + a.size / 4), None, patch_id=a.id, author="t")
        proj.mark_reviewed(d.id, "t")  # one kept as it was
        assert pending_corrections(proj) == 3
        second = train(proj, FAST, from_model=mid)
        assert pending_corrections(proj) == 0
        assert second.status == "done"

        r1, r2 = project_rounds(proj)
        assert [r1.model_id, r2.model_id] == [mid, second.model_id] and r2.parent_id == mid
        assert (r1.round, r1.corrections, r1.reviewed, r1.label_versions) == (1, 0, 0, 1)  # the import
        assert (r2.round, r2.corrections, r2.reviewed, r2.label_versions) == (2, 3, 1, 4)
        with proj.store.read() as s:
            rows = {m.id: m for m in s.query(ModelRow).all()}
        for r in (r1, r2):
            m = json.loads(rows[r.model_id].metrics)
            split = json.loads(rows[r.model_id].patches)
            assert r.train_patches == len(split["train"]) and r.val_patches == len(split["val"])
            assert r.mean_iou == pytest.approx(m["val_macro_iou"]) and r.mean_dice == pytest.approx(m["val_macro_dice"])
            assert list(r.val_iou) == ["Background", "Epithelium"]
            assert np.nanmean(list(r.val_iou.values())) == pytest.approx(r.mean_iou)
        assert r2.delta_iou == pytest.approx(r2.mean_iou - r1.mean_iou)
        active = proj.models.active()
        assert active is not None and [r.active for r in (r1, r2)] == [active.id == mid, active.id == second.model_id]
        assert r1.promoted

        # per-slide IoU: the stored predictions, the same figure as `slideloop metrics`; none before predicting
        assert r2.slide_iou == {}
        assert r1.slide_iou[slide.name] == pytest.approx(proj.metrics(mid)["all"]["slides"][slide.name]["macro_iou"])
        predict(proj, second.model_id, batch_size=16)
        r2 = project_rounds(proj)[1]
        want = proj.metrics(second.model_id)["all"]["slides"][slide.name]["macro_iou"]
        assert r2.slide_iou[slide.name] == pytest.approx(want)

        # a model from before per-class figures were stored: pooled confusion of its validation patches
        with proj.store.write() as s:
            row = s.get(ModelRow, second.model_id)
            m = json.loads(row.metrics)
            row.metrics = json.dumps({k: v for k, v in m.items() if k not in ("val_iou", "val_dice")})
            val_ids = json.loads(row.patches)["val"]
        with proj.store.read() as s:
            cms = [json.loads(r.confusion) for r in s.query(PatchScoreRow).filter(
                PatchScoreRow.model_id == second.model_id, PatchScoreRow.patch_id.in_(val_ids))]
        pooled = scores(np.sum(np.asarray(cms), axis=0))
        r2 = project_rounds(proj)[1]
        assert list(r2.val_iou.values()) == pytest.approx(pooled["iou"], nan_ok=True)
        assert r2.mean_iou == pytest.approx(m["val_macro_iou"])  # the stored mean is kept
