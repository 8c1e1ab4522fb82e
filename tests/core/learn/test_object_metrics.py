"""Object-level metrics (al_core.learn.object_metrics) against cases computed by hand, and their evaluation on
the real sample (al_core.learn.object_eval)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from al_core.learn.object_eval import object_metrics
from al_core.learn.object_metrics import (
    aji,
    bootstrap_ci,
    instances,
    object_dice,
    object_f1,
    object_hausdorff,
    object_scores,
)
from al_core.project.project import Project


def _case() -> tuple[np.ndarray, np.ndarray]:
    """Label: A (rows 0-1, cols 0-1) and B (rows 0-1, cols 5-6). Prediction: A' = A plus col 2, and C (rows
    4-5, cols 0-1) where there is nothing; B is missed."""
    gt = np.zeros((6, 8), bool)
    gt[0:2, 0:2] = gt[0:2, 5:7] = True
    pred = np.zeros((6, 8), bool)
    pred[0:2, 0:3] = pred[4:6, 0:2] = True
    return gt, pred


def test_hand_computed_case():
    gt, pred = _case()
    g, s = instances(gt), instances(pred)
    assert g.max() == 2 and s.max() == 2
    # AJI: A pairs with A' (∩ 4, ∪ 6); B pairs with nothing (+4); C is never paired (+4) → 4 / 14
    assert aji(g, s) == pytest.approx(4 / 14)
    # F1: IoU(A, A') = 4/6 > 0.5 → TP 1, FP 1 (C), FN 1 (B) → 2 / 4
    assert object_f1(g, s) == {"f1": 0.5, "precision": 0.5, "recall": 0.5, "tp": 1, "fp": 1, "fn": 1}
    # object Dice: label side ½·0.8 + ½·0 = 0.4; prediction side 0.6·0.8 + 0.4·0 = 0.48 → 0.44
    assert object_dice(g, s) == pytest.approx(0.44)
    # Hausdorff: H(A, A') = 1; B has no overlap, nearest is A' (H 5, C is √41 away); C's nearest is A (H 4)
    # label side ½·1 + ½·5 = 3; prediction side 0.6·1 + 0.4·4 = 2.2 → 2.6
    assert object_hausdorff(g, s) == pytest.approx(2.6)


def test_perfect_empty_and_missing():
    gt, _ = _case()
    perfect = object_scores(gt, gt)
    assert (perfect["aji"], perfect["f1"], perfect["object_dice"], perfect["object_hausdorff"]) == (1, 1, 1, 0)
    empty = np.zeros_like(gt)
    both = object_scores(empty, empty)
    assert (both["aji"], both["f1"], both["object_dice"], both["object_hausdorff"]) == (1, 1, 1, 0)
    missed = object_scores(gt, empty)
    assert (missed["aji"], missed["f1"], missed["object_dice"]) == (0, 0, 0)
    assert missed["object_hausdorff"] == pytest.approx(math.hypot(6, 8))


def test_diagonal_pixels_are_one_object_and_a_split_costs_aji():
    d = np.eye(4, dtype=bool)
    assert instances(d).max() == 1
    gt = np.zeros((4, 6), bool)
    gt[:, 0:4] = True  # one object of 16 px
    pred = np.zeros((4, 6), bool)
    pred[:, 0:2] = pred[:, 3:4] = True  # split in two (8 + 4 px)
    # best partner of the label object is the 8-px piece (IoU 0.5): C 8, U 16; the 4-px piece is unpaired: +4
    assert aji(instances(gt), instances(pred)) == pytest.approx(8 / 20)
    assert object_f1(instances(gt), instances(pred))["tp"] == 0  # IoU 0.5 is not above 0.5


def test_bootstrap_interval():
    mean, lo, hi = bootstrap_ci([0.5] * 10)
    assert mean == lo == hi == 0.5
    mean, lo, hi = bootstrap_ci([0.0, 1.0] * 20, seed=1)
    assert mean == 0.5 and 0.3 < lo < 0.5 < hi < 0.7
    assert bootstrap_ci([0.0, 1.0] * 20, seed=1) == (mean, lo, hi)
    assert all(math.isnan(v) for v in bootstrap_ci([float("nan")]))


def test_object_metrics_on_the_sample(trained):
    root, mid = trained
    with Project.open(root) as proj:
        res = object_metrics(proj, "latest", n_boot=200)
        with pytest.raises(ValueError, match="no class 'Nucleus'.*Epithelium"):
            object_metrics(proj, "latest", ["Nucleus"])
    assert res["model_id"] == mid and list(res["classes"]) == ["Epithelium"]
    ep = res["classes"]["Epithelium"]
    o = ep["overall"]
    assert list(ep["slides"]) == ["CMU-1-Small-Region"] and o["ci_over"] == "patches" and o["patches"] >= 1
    for m in ("aji", "f1", "object_dice"):
        assert 0.0 <= o[m]["low"] <= o[m]["mean"] <= o[m]["high"] <= 1.0
    assert o["object_hausdorff"]["mean"] >= 0
