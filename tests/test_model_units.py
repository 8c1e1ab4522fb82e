"""Fast unit tests of the model side: metrics by hand, ranking selection, augmentation, checkpoints."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from al_core.augment import PaperAugment
from al_core.errors import CheckpointError
from al_core.metrics import aggregate, confusion, patch_iou, scores, split_slides
from al_core.model import (
    ModelConfig,
    build_model,
    load_checkpoint,
    load_model,
    load_weights,
    save_checkpoint,
)
from al_core.rank import IoURanker, RandomRanker, UncertaintyRanker, select_top

TINY = dict(encoder="tu-mobilenetv3_small_050", encoder_depth=3, decoder_channels=(16, 8, 8), patch=64)


def tiny_config(**kw) -> ModelConfig:
    base = dict(class_idx=(0, 1), class_names=("Background", "Epithelium"), class_colors=("#000000", "#c80000"))
    return ModelConfig(**(base | TINY | kw))


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
        with pytest.raises(Exception, match="predict with --tta"):
            UncertaintyRanker("disagreement")(_scores_df())
        r1, r2 = RandomRanker(3)(_scores_df()), RandomRanker(3)(_scores_df())
        assert sorted(r1["patch_id"]) == [4, 7, 8] and r1["patch_id"].tolist() == r2["patch_id"].tolist()
        with pytest.raises(ValueError, match="fraction"):
            select_top(r1, fraction=0)


class TestAugment:
    def test_masks_stay_nearest_and_shapes_keep(self):
        rng = np.random.default_rng(0)
        img = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
        mask = rng.choice(np.array([0, 1, 255], np.uint8), (64, 64))
        aug = PaperAugment(p_eligible=1.0, p_each=1.0, seed=0)
        for _ in range(20):
            a, m = aug(img, mask)
            assert a.shape == img.shape and a.dtype == np.uint8 and m.shape == mask.shape
            assert set(np.unique(m)) <= {0, 1, 255}

    def test_eligible_share_and_independent_transforms(self):
        img = np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8)
        mask = np.zeros((32, 32), np.uint8)
        aug = PaperAugment(seed=2)
        changed = np.mean([not np.array_equal(aug(img, mask)[0], img) for _ in range(400)])
        # 75 % eligible, ~9 transforms at p=0.3 (some invisible at tiny strength): ~0.7, far above the ~0.3 that
        # albumentations' shared per-child seed would give (all transforms firing together)
        assert 0.6 < changed <= 0.8

    def test_seeded_is_reproducible(self):
        img = np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8)
        mask = np.zeros((32, 32), np.uint8)
        a, b = PaperAugment(seed=5), PaperAugment(seed=5)
        for _ in range(10):
            assert np.array_equal(a(img, mask)[0], b(img, mask)[0])


class TestCheckpoints:
    def test_round_trip(self, tmp_path):
        cfg = tiny_config()
        torch.manual_seed(0)
        model = build_model(cfg)
        path = save_checkpoint(tmp_path / "m.pt", model, cfg, extra={"epoch": 3})
        loaded, cfg2 = load_model(path)
        assert cfg2 == cfg and not loaded.training
        x = torch.rand(1, 3, 64, 64)
        with torch.no_grad():
            assert torch.allclose(model.eval()(x), loaded(x))
        assert load_checkpoint(path).extra == {"epoch": 3}

    def test_corrupt_and_foreign_files(self, tmp_path):
        bad = tmp_path / "bad.pt"
        bad.write_bytes(b"not a checkpoint at all")
        with pytest.raises(CheckpointError, match=r"bad\.pt: not a readable checkpoint"):
            load_checkpoint(bad)
        cfg = tiny_config()
        good = save_checkpoint(tmp_path / "good.pt", build_model(cfg), cfg)
        trunc = tmp_path / "trunc.pt"
        trunc.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
        with pytest.raises(CheckpointError, match="trunc.pt: not a readable checkpoint"):
            load_model(trunc)
        other = tmp_path / "other.pt"
        torch.save({"state_dict": {}}, other)
        with pytest.raises(CheckpointError, match="not a slideloop model checkpoint"):
            load_checkpoint(other)
        with pytest.raises(CheckpointError, match="checkpoint file not found"):
            load_checkpoint(tmp_path / "missing.pt")

    def test_other_class_set_or_architecture(self, tmp_path):
        cfg = tiny_config()
        path = save_checkpoint(tmp_path / "m.pt", build_model(cfg), cfg)
        ckpt = load_checkpoint(path)
        three = tiny_config(class_idx=(0, 1, 2), class_names=("Background", "Epithelium", "Stroma"),
                            class_colors=("#000000", "#c80000", "#00a000"))
        with pytest.raises(CheckpointError, match="does not match the requested"):
            load_weights(build_model(three), ckpt, path, expected=three)
        renamed = tiny_config(class_names=("Background", "Tumour"))
        with pytest.raises(CheckpointError, match="classes .* differ"):
            load_weights(build_model(renamed), ckpt, path, expected=renamed)
        wider = tiny_config(decoder_channels=(32, 16, 8))
        with pytest.raises(CheckpointError, match="weights do not fit"):
            load_weights(build_model(wider), ckpt, path)

    def test_config_validation(self):
        with pytest.raises(ValueError, match="at least 2 classes"):
            tiny_config(class_idx=(0,), class_names=("Background",), class_colors=("#000000",))
        with pytest.raises(ValueError, match="multiple of 8"):
            tiny_config(patch=100)
        lut = tiny_config(class_idx=(0, 2), ignore_classes=(1,)).mask_lut()
        assert lut[0] == 0 and lut[2] == 1 and lut[1] == 255 and lut[7] == 255
