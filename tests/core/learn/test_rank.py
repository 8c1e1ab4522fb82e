"""The review queue (al_core.learn.rank): rankers and selection on a hand-made scores frame, and on the
session's trained model."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from al_core import NoModelError
from al_core.errors import ProjectError
from al_core.learn.rank import (
    IoURanker,
    RandomRanker,
    UncertaintyRanker,
    make_ranker,
    review_queue,
    scores_frame,
    select_top,
)
from al_core.project.project import Project


def _scores_df() -> pd.DataFrame:
    return pd.DataFrame({
        "patch_id": range(1, 9),
        "slide": ["a"] * 4 + ["b"] * 4,
        "labelled": [True, True, True, False, True, True, False, False],
        "iou": [0.9, 0.2, 0.5, np.nan, 0.1, 0.95, np.nan, np.nan],
        "entropy": [0.1, 0.3, 0.2, 0.8, 0.4, 0.05, 0.2, 0.9],
        "disagreement": [np.nan] * 8,
    })


class TestRanking:
    def test_iou_lowest_first_fraction_and_count(self):
        ranked = IoURanker()(_scores_df())
        assert ranked["patch_id"].tolist() == [5, 2, 3, 1, 6]
        assert select_top(ranked, fraction=0.05)["patch_id"].tolist() == [5]  # ceil(5 %) = at least one
        assert select_top(ranked, fraction=0.5)["patch_id"].tolist() == [5, 2, 3]
        top = select_top(ranked, count=2)
        assert top["patch_id"].tolist() == [5, 2] and top["rank"].tolist() == [1, 2]

    def test_per_slide(self):
        top = select_top(IoURanker()(_scores_df()), count=1, per_slide=True)
        assert top["patch_id"].tolist() == [5, 2]  # worst of b (0.1), worst of a (0.2), in rank order

    def test_uncertainty_and_random(self):
        assert UncertaintyRanker()(_scores_df())["patch_id"].tolist() == [8, 4, 7]
        with pytest.raises(ProjectError, match="predict with test-time augmentation first"):
            UncertaintyRanker("disagreement")(_scores_df())
        r1, r2 = RandomRanker(3)(_scores_df()), RandomRanker(3)(_scores_df())
        assert sorted(r1["patch_id"]) == [4, 7, 8] and r1["patch_id"].tolist() == r2["patch_id"].tolist()
        with pytest.raises(ValueError, match="fraction"):
            select_top(r1, fraction=0)

    def test_make_ranker_and_bad_counts(self):
        assert isinstance(make_ranker("iou"), IoURanker) and make_ranker("disagreement").by == "disagreement"
        r = make_ranker("random", seed=1, labelled=True)
        assert r.labelled and sorted(r(_scores_df())["patch_id"]) == [1, 2, 3, 5, 6]
        with pytest.raises(ValueError, match="unknown ranking 'best'"):
            make_ranker("best")
        with pytest.raises(ValueError, match="count must be >= 0"):
            select_top(IoURanker()(_scores_df()), count=-1)
        assert select_top(IoURanker()(_scores_df()).head(0), fraction=0.5).empty


def test_review_queue_on_the_trained_model(trained):
    root, mid = trained
    with Project.open(root) as proj:
        df = scores_frame(proj, mid)
        assert df.attrs["model_id"] == mid and list(df.columns)[:3] == ["patch_id", "slide", "col"]
        q = review_queue(proj, "latest", count=4)
        assert q.attrs["model_id"] == mid and q["rank"].tolist() == [1, 2, 3, 4]
        assert q["labelled"].all() and q["iou"].is_monotonic_increasing
        assert q["patch_id"].tolist() == IoURanker()(df)["patch_id"].head(4).tolist()
        unl = review_queue(proj, mid, by="entropy", fraction=1.0)
        assert len(unl) == int((~df["labelled"]).sum()) and not unl["labelled"].any()
        assert unl["entropy"].is_monotonic_decreasing
        # the facade's review_queue is the same query
        assert proj.review_queue(count=4)["patch_id"].tolist() == q["patch_id"].tolist()


def test_no_predictions_on_the_current_grid(trained, tmp_path):
    import shutil

    root, mid = trained
    shutil.copytree(root, tmp_path / "p")
    with Project.open(tmp_path / "p") as proj:
        proj.build_grid(patch=64, overlap=0)  # a new grid: the stored scores belong to the old one
        with pytest.raises(NoModelError, match=f"model {mid} has no stored predictions on the current grid"):
            scores_frame(proj, mid)


def test_mc_dropout_scores_rank_unlabelled_patches(trained, tmp_path):
    import torch
    from _engine import clone

    from al_core.learn.mc_dropout import mutual_information
    from al_core.learn.predict import predict

    # hand-computed BALD: two samples (1, 0) and (0, 1) → mean (½, ½): H = ln 2, mean H = 0 → 1 after / ln 2
    probs = torch.tensor([[[[[1.0]], [[0.0]]]], [[[[0.0]], [[1.0]]]]])  # (T=2, B=1, C=2, 1, 1)
    assert float(mutual_information(probs)[0]) == pytest.approx(1.0, abs=1e-6)
    assert float(mutual_information(torch.stack([probs[0], probs[0]]))[0]) == pytest.approx(0.0, abs=1e-6)
    root, mid = trained
    with clone(root, tmp_path / "p") as proj:
        with pytest.raises(ProjectError, match="predict with MC dropout first"):
            review_queue(proj, mid, by="mcdropout", count=3)
        predict(proj, mid, batch_size=16, mc_samples=4)
        first = scores_frame(proj, mid)
        predict(proj, mid, batch_size=16, mc_samples=4)
        again = scores_frame(proj, mid)
        q = review_queue(proj, mid, by="mcdropout", fraction=1.0)
        with pytest.raises(ValueError, match="at least 2 samples"):
            predict(proj, mid, mc_samples=1)
    assert first["mcdropout"].notna().all() and (first["mcdropout"] >= 0).all() and (first["mcdropout"] <= 1).all()
    assert first["mcdropout"].tolist() == again["mcdropout"].tolist()  # seeded masks: the same ranking twice
    assert first["mcdropout"].nunique() > 1
    assert not q["labelled"].any() and q["mcdropout"].is_monotonic_decreasing
