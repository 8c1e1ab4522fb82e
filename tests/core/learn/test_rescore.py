"""A saved correction re-scores its patches against the stored prediction at once, and the patches whose label
changed since the model predicted them are known (al_core.learn.rescore, through the Project facade)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _engine import clone
from shapely.geometry import box

from al_core.learn.rank import review_queue, scores_frame
from al_core.learn.rescore import changed_since_prediction
from al_core.project.project import Project
from al_core.project.schema import PatchScoreRow


def _row(proj: Project, mid: int, pid: int) -> PatchScoreRow:
    with proj.store.read() as s:
        row = s.get(PatchScoreRow, (mid, pid))
    assert row is not None
    return row


def _worst(proj: Project, mid: int) -> int:
    return int(review_queue(proj, mid, by="iou", count=1)["patch_id"].iloc[0])


def test_accepting_the_prediction_rescores_the_patch_to_full_agreement(trained, tmp_path):
    root, mid = trained
    with clone(root, tmp_path / "p") as proj:
        pid = _worst(proj, mid)
        before = scores_frame(proj, mid).set_index("patch_id")
        assert before.loc[pid, "iou"] < 0.99
        assert changed_since_prediction(proj, mid) == set()
        proj.accept_prediction(pid, mid)
        after = scores_frame(proj, mid).set_index("patch_id")
        # the label is now the stored prediction: the IoU says so without predicting again
        assert after.loc[pid, "iou"] == pytest.approx(1.0, abs=0.02)
        assert after.loc[pid, "dice"] == pytest.approx(1.0, abs=0.02)
        cm = np.asarray(json.loads(_row(proj, mid, pid).confusion or "[]"))
        assert cm.sum() == proj.patch(pid).patch ** 2 and np.trace(cm) / cm.sum() > 0.98
        assert _worst(proj, mid) != pid  # the queue's order follows at once
        # what it was predicted against is kept: the queue can tell the label changed since
        assert after.loc[pid, "label_version"] == before.loc[pid, "label_version"]
        assert changed_since_prediction(proj, mid) == {pid}
        # the other patches keep their predict-time scores
        rest = before.index != pid
        d = (after.loc[rest, "iou"].fillna(-1) - before.loc[rest, "iou"].fillna(-1)).abs()
        assert (d < 1e-9).all(), d[d >= 1e-9]


def test_erasing_a_patch_scores_it_against_background(trained, tmp_path):
    """All-background label vs a prediction covering a share f of class 1: IoU_bg = 1 - f, IoU_1 = 0."""
    root, mid = trained
    with clone(root, tmp_path / "p") as proj:
        df = scores_frame(proj, mid)
        for pid in df.loc[df["labelled"], "patch_id"]:
            f = float((proj.predictions.classes(mid, int(pid)) == 1).mean())
            if 0.05 < f < 0.95:
                break
        else:
            pytest.fail("no labelled patch with a mixed prediction")
        p = proj.patch(int(pid))
        proj.correct(p.slide_id, box(p.x, p.y, p.x + p.size, p.y + p.size), None, patch_id=p.id)
        assert not proj.label_mask(p).any()
        row = _row(proj, mid, p.id)
        assert row.labelled and row.iou == pytest.approx((1 - f) / 2, abs=1e-6)
        assert row.dice == pytest.approx((2 * (1 - f) / (2 - f)) / 2, abs=1e-6)
        assert p.id in changed_since_prediction(proj, mid)


def test_a_small_edit_marks_only_the_patch_whose_label_it_changed(trained, tmp_path):
    root, mid = trained
    with clone(root, tmp_path / "p") as proj:
        df = scores_frame(proj, mid)
        labelled = df.loc[df["labelled"], "patch_id"].tolist()
        p = proj.patch(int(labelled[len(labelled) // 2]))
        start, before = proj.label_version(p.slide_id), _row(proj, mid, p.id).iou
        n = p.patch
        inside = proj.label_mask(p)[n // 5:n // 2, n // 5:n // 2]
        cls = None if inside.mean() > 0.5 else 1  # paint what the square is not
        square = box(p.x + p.size / 5, p.y + p.size / 5, p.x + p.size / 2, p.y + p.size / 2)
        proj.correct(p.slide_id, square, cls)
        assert changed_since_prediction(proj, mid) == {p.id}
        assert _row(proj, mid, p.id).iou != pytest.approx(before, abs=1e-3)
        proj.revert_patch(p.id, start)  # ... and back: the label is the one it was predicted against again
        assert changed_since_prediction(proj, mid) == set()
        assert _row(proj, mid, p.id).iou == pytest.approx(before, abs=0.03)


def test_a_reviewed_unlabelled_patch_gets_a_score(trained, tmp_path):
    root, mid = trained
    with clone(root, tmp_path / "p") as proj:
        df = scores_frame(proj, mid)
        pid = int(df.loc[~df["labelled"], "patch_id"].iloc[0])
        proj.mark_reviewed(pid, "tester")
        row = _row(proj, mid, pid)
        assert row.labelled and row.iou is not None and 0.0 <= row.iou <= 1.0
        assert pid in set(review_queue(proj, mid, by="iou", fraction=1.0)["patch_id"])
        assert changed_since_prediction(proj, mid) == set()  # reviewing changed no label
