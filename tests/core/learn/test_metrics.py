"""The paper's metrics (al_core.learn.metrics), checked against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from al_core.learn.metrics import aggregate, confusion, patch_dice, patch_iou, scores, split_slides


class TestMetrics:
    def test_hand_computed_case(self):
        # label / prediction, 255 = ignore (excluded)
        label = np.array([[0, 0, 1, 1], [0, 1, 1, 255]])
        pred = np.array([[0, 1, 1, 1], [0, 0, 1, 1]])
        cm = confusion(label, pred, 2)
        # label 0 (3 px): predicted 0,1,0 ; label 1 (4 px): predicted 1,1,0,1
        assert cm.tolist() == [[2, 1], [1, 3]]
        s = scores(cm)
        assert s["pixel_accuracy"] == pytest.approx(5 / 7)
        assert s["mean_accuracy"] == pytest.approx((2 / 3 + 3 / 4) / 2)
        iou0, iou1 = 2 / (3 + 3 - 2), 3 / (4 + 4 - 3)
        assert s["iou"] == pytest.approx([iou0, iou1])
        assert s["macro_iou"] == pytest.approx((iou0 + iou1) / 2)
        assert s["weighted_iou"] == pytest.approx((3 * iou0 + 4 * iou1) / 7)
        assert s["dice"] == pytest.approx([2 * 2 / 6, 2 * 3 / 8])
        assert patch_iou(cm) == pytest.approx((iou0 + iou1) / 2)

    def test_absent_class_is_not_scored(self):
        cm = confusion(np.zeros((3, 3)), np.zeros((3, 3)), 3)
        s = scores(cm)
        assert s["iou"][0] == 1.0 and math.isnan(s["iou"][1]) and math.isnan(s["iou"][2])
        assert s["macro_iou"] == 1.0
        assert patch_iou(np.zeros((2, 2))) == 1.0  # an all-ignore patch has nothing to disagree on

    def test_per_patch_then_per_slide_then_over_slides(self):
        perfect = np.array([[5, 0], [0, 5]])
        half = np.array([[1, 1], [1, 1]])  # IoU 1/3 for both classes
        agg = aggregate(["a", "a", "b"], [perfect, half, perfect], ["bg", "fg"])
        # slide a: (1 + 1/3) / 2 = 2/3; slide b: 1; over slides: (2/3 + 1) / 2 (not the patch mean 7/9)
        assert agg["slides"]["a"]["macro_iou"] == pytest.approx(2 / 3)
        assert agg["overall"]["macro_iou"] == pytest.approx(5 / 6)
        assert agg["overall"]["dice"]["fg"] == pytest.approx(((1 + 0.5) / 2 + 1) / 2)
        assert agg["overall"]["slides"] == 2 and agg["patches"] == 3

    def test_confusion_rejects_bad_input(self):
        with pytest.raises(ValueError, match="sizes differ"):
            confusion(np.zeros(3), np.zeros(4), 2)
        with pytest.raises(ValueError, match="outside 0..1"):
            confusion(np.array([0, 2]), np.array([0, 1]), 2)

    def test_slide_split(self):
        train, test = split_slides(["s1", "s2", "s3", "s4"], test_fraction=0.25, seed=1)
        assert len(test) == 1 and sorted(train + test) == ["s1", "s2", "s3", "s4"]
        assert split_slides(["a", "b"], test=["b"]) == (["a"], ["b"])
        with pytest.raises(ValueError, match="not in the project"):
            split_slides(["a"], test=["zz"])

    def test_patch_dice_and_ignore_index(self):
        label = np.array([0, 1, 1, 255, 255])
        pred = np.array([0, 1, 0, 1, 0])
        cm = confusion(label, pred, 2)
        assert cm.tolist() == [[1, 0], [1, 1]]  # the 255 pixels are not counted at all
        assert patch_dice(cm) == pytest.approx((2 * 1 / 3 + 2 * 1 / 3) / 2)
        assert confusion(np.array([0, 9]), np.array([0, 1]), 2, ignore_index=9).sum() == 1
