"""Predicting every patch (al_core.learn.predict) and reading predictions back (al_core.learn.predictions,
al_core.learn.evaluate): probabilities, scores, a wrong label found, accepting a prediction as the label."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _engine import clone
from shapely.geometry import box

from al_core.errors import ProjectError
from al_core.learn.evaluate import stored_metrics
from al_core.learn.predict import predict
from al_core.learn.predictions import PredictionStore, load_prediction, prediction_classes
from al_core.learn.rank import review_queue, scores_frame
from al_core.project.project import Project


def test_predictions_and_scores_for_every_patch(trained):
    root, mid = trained
    with Project.open(root) as proj:
        patches = proj.patches()
        df = scores_frame(proj, mid)
        assert sorted(df["patch_id"]) == sorted(p.id for p in patches)
        labelled = proj.labelled_patch_ids()
        assert set(df.loc[df["labelled"], "patch_id"]) == labelled
        assert df.loc[df["labelled"], "iou"].between(0, 1).all() and df.loc[~df["labelled"], "iou"].isna().all()
        assert df["entropy"].between(0, 1).all()
        probs = load_prediction(root, mid, patches[0].id)
        assert probs.shape == (2, 32, 32) and probs.dtype == np.float32
        assert np.allclose(probs.sum(0), 1.0, atol=1e-2)
        assert np.array_equal(proj.predictions.probabilities(mid, patches[0].id), probs)
        cls = prediction_classes(root, mid, patches[0].id)
        assert cls.shape == (32, 32) and set(np.unique(cls)) <= {0, 1}
        assert np.array_equal(proj.predictions.classes(mid, patches[0].id), cls)
        # the model learned something real: better than chance on its labelled patches
        assert df.loc[df["labelled"], "iou"].median() > 0.5
        m = stored_metrics(proj, mid)
        assert 0 < m["all"]["overall"]["macro_iou"] <= 1 and m["stale_patches"] == 0
        queue = review_queue(proj, mid, fraction=0.05)
        assert len(queue) == int(np.ceil(0.05 * len(labelled)))
        assert queue["iou"].iloc[0] == df["iou"].min()


def test_stored_index_and_missing_predictions(trained, tmp_path):
    root, mid = trained
    store = PredictionStore(root)
    index, rows = store.index(mid)
    assert index["model_id"] == mid and index["factor"] == 4 and index["class_idx"] == [0, 1]
    assert len(rows) == len(index["patch_ids"]) and index["shape"] == [2, 32, 32]
    with pytest.raises(ProjectError, match="no predictions of model 7"):
        store.probabilities(7, 1)
    with pytest.raises(ProjectError, match="patch 99999 has no prediction from model"):
        store.probabilities(mid, 99999)
    # a rewritten index is read again (the store keeps parsed indexes)
    with clone(root, tmp_path / "p") as proj:
        before = proj.predictions.index(mid)[0]["patch_ids"]
        predict(proj, mid, batch_size=16, factor=8)
        index2, _ = proj.predictions.index(mid)
        assert index2["factor"] == 8 and index2["shape"] == [2, 16, 16] and index2["patch_ids"] == before
        assert proj.predictions.probabilities(mid, before[0]).shape == (2, 16, 16)


def test_bad_predict_settings(trained):
    root, mid = trained
    with Project.open(root) as proj:
        with pytest.raises(ValueError, match="at least 1"):
            predict(proj, mid, batch_size=0)
        with pytest.raises(ValueError, match="does not divide"):
            predict(proj, mid, factor=3)


def test_cancelled_prediction_stores_nothing(trained, tmp_path):
    root, mid = trained
    with clone(root, tmp_path / "p") as proj:
        probs = proj.root / "predictions" / str(mid) / "probs.npy"
        before = probs.read_bytes()
        with pytest.raises(ProjectError, match="cancelled; nothing was stored"):
            predict(proj, mid, batch_size=4, cancel=lambda: True)
        assert probs.read_bytes() == before and len(scores_frame(proj, mid)) == len(proj.patches())


@pytest.mark.slow
def test_tta_disagreement_is_stored_and_ranks_unlabelled_patches(trained, tmp_path):
    root, mid = trained
    with clone(root, tmp_path / "p") as proj:
        res = predict(proj, mid, batch_size=16, tta=True)
        assert res.patches == len(proj.patches())
        df = scores_frame(proj, mid)
        assert df["disagreement"].between(0, 1).all() and df["disagreement"].notna().all()
        queue = review_queue(proj, mid, by="disagreement", count=3)
        assert not queue["labelled"].any() and queue["disagreement"].is_monotonic_decreasing


@pytest.mark.slow
def test_deliberately_wrong_label_goes_to_the_top(trained, tmp_path):
    root, mid = trained
    with clone(root, tmp_path / "p") as proj:
        df = scores_frame(proj, mid)
        best = df[df["labelled"]].sort_values("iou").iloc[-1]  # the patch the model agrees with most
        patch = proj.patch(int(best["patch_id"]))
        # relabel it wrongly: every class swapped inside the patch (epithelium ↔ background)
        region = box(patch.x, patch.y, patch.x + patch.size, patch.y + patch.size)
        epi = [g.intersection(region) for _, c, g in proj.annotations(patch.slide_id) if c == 1]
        proj.correct(patch.slide_id, region, 1, author="saboteur")
        for g in epi:
            if not g.is_empty and g.area > 0:
                proj.correct(patch.slide_id, g, None, author="saboteur")
        assert stored_metrics(proj, mid)["stale_patches"] >= 1  # relabelled since the prediction
        predict(proj, mid, batch_size=16)
        queue = review_queue(proj, mid, count=3)
        assert int(queue["patch_id"].iloc[0]) == patch.id
        assert queue["iou"].iloc[0] < best["iou"] and queue["iou"].iloc[0] < 0.3


def test_accepting_a_prediction_makes_it_the_label(trained, tmp_path):
    root, mid = trained
    with clone(root, tmp_path / "p") as proj:
        df = scores_frame(proj, mid)
        worst = proj.patch(int(df[df["labelled"]].sort_values("iou").iloc[0]["patch_id"]))
        classes = proj.predictions.classes(mid, worst.id)
        before = proj.label_version(worst.slide_id)
        v = proj.accept_prediction(worst.id, mid, author="dr-a", base_version=before)
        assert v == before + 1 and worst.id in proj.reviewed_patch_ids()
        # the label is the stored (4x reduced) prediction, upsampled to the patch
        label = proj.label_mask(worst)
        up = np.kron(classes, np.ones((4, 4), np.uint8))
        assert (label == up).mean() > 0.99
        # only inside a region: the rest of the patch keeps its label
        other = proj.patch(int(df[df["labelled"]].sort_values("iou").iloc[1]["patch_id"]))
        keep = proj.label_mask(other)
        half = box(other.x, other.y, other.x + other.size / 2, other.y + other.size)
        proj.accept_prediction(other.id, "latest", author="dr-a", region=half)
        after = proj.label_mask(other)
        assert np.array_equal(after[:, 66:], keep[:, 66:])
        with proj.store.read() as s:
            from al_core.project.schema import ReviewRow

            actions = [r.action for r in s.query(ReviewRow).order_by(ReviewRow.id)]
        assert actions == ["accept", "accept"]
        hist = proj.labels.history(worst.slide_id)
        assert hist[-1].message == f"accept prediction of model {mid}" and hist[-1].author == "dr-a"
        assert json.loads(proj.models.resolve(mid).label_versions)  # the model row is untouched
