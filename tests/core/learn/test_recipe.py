"""The training recipe (al_core.learn.recipe and its pieces: Dice+CE loss, warm-up + cosine schedule, HED stain
jitter, pretrained weights only from the local cache) and how ``train`` uses it on the real sample."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from _engine import TINY, make_project

from al_core.learn.losses import DiceCELoss
from al_core.learn.recipe import (
    RECIPES,
    RecipeAugment,
    cached_encoder_weights,
    get_recipe,
    make_optimizer,
    make_scheduler,
)
from al_core.learn.schedule import warmup_cosine, warmup_cosine_factor
from al_core.learn.stain_aug import HEDJitter, hed_jitter
from al_core.learn.train import TrainOptions, train
from al_core.wsi.slides import open_slide


def test_dice_ce_matches_hand_computed_values_and_skips_ignore():
    # 1 image, 2 classes, 2 counted pixels + 1 ignored; logits (0, 0) give p = 0.5 everywhere
    logits = torch.zeros(1, 2, 1, 3)
    target = torch.tensor([[[0, 1, 255]]])
    loss = DiceCELoss(255, smooth=0.0)(logits, target)
    # CE = ln 2; per-class Dice = 2·0.5 / (1 + 1) = 0.5 for both classes → 1 − 0.5
    assert float(loss) == pytest.approx(math.log(2) + 0.5, abs=1e-6)
    perfect = torch.tensor([[[[9.0, -9.0, 0.0]], [[-9.0, 9.0, 0.0]]]])
    assert float(DiceCELoss(255, smooth=0.0)(perfect, target)) < 1e-3
    # the ignored pixel's logits never matter
    changed = perfect.clone()
    changed[0, :, 0, 2] = torch.tensor([50.0, -50.0])
    assert float(DiceCELoss(255)(changed, target)) == pytest.approx(float(DiceCELoss(255)(perfect, target)))


def test_warmup_then_cosine_to_the_floor():
    f = [warmup_cosine_factor(s, 100, 10, 0.01) for s in range(120)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(f[:10], f[1:10], strict=False))
    assert all(a >= b for a, b in zip(f[10:100], f[11:100], strict=False))
    assert f[55] == pytest.approx(0.01 + 0.99 * 0.5) and f[100] == f[119] == pytest.approx(0.01)
    with pytest.raises(ValueError):
        warmup_cosine_factor(0, 0, 1)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = warmup_cosine(opt, 20, 0.1)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1.0) and max(lrs) == pytest.approx(2.0) and lrs[-1] < 0.1


def _sample_patch(sample_svs):
    with open_slide(sample_svs) as s:
        return s.read((800, 800), (128, 128), downsample=1.0)


def test_hed_jitter_is_identity_at_zero_and_moves_colour_only(sample_svs):
    img = _sample_patch(sample_svs)
    assert np.abs(hed_jitter(img, np.ones(3), np.zeros(3)).astype(int) - img).max() <= 1
    darker_h = hed_jitter(img, [1.3, 1.0, 1.0], [0, 0, 0])
    assert darker_h.mean() < img.mean()  # more haematoxylin absorbs more light
    t = HEDJitter(p=1.0)
    t.set_random_seed(3)
    a = t(image=img)["image"]
    t.set_random_seed(3)
    assert np.array_equal(a, t(image=img)["image"]) and not np.array_equal(a, img)
    mask = np.arange(128 * 128, dtype=np.uint8).reshape(128, 128)
    aug = RecipeAugment(get_recipe("default"), seed=0)
    for _ in range(5):
        out, m = aug(img, mask)
        assert out.shape == img.shape and out.dtype == np.uint8 and m.shape == mask.shape
    with pytest.raises(ValueError):
        HEDJitter(scale=1.5)


def test_recipes_by_name():
    assert set(RECIPES) >= {"default", "paper"}
    paper = get_recipe("paper")
    assert (paper.optimizer, paper.lr, paper.weight_decay, paper.loss) == ("adam", 5e-5, 1e-4, "ce")
    opt = make_optimizer(get_recipe("default"), [torch.nn.Parameter(torch.zeros(1))], None, None)
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["lr"] == get_recipe("default").lr
    with pytest.raises(ValueError, match="unknown recipe 'fast'.*default"):
        get_recipe("fast")
    with pytest.raises(ValueError, match="unknown recipe"):
        TrainOptions(recipe="fast")


def test_pretrained_weights_only_from_the_local_cache(tmp_path):
    from segmentation_models_pytorch.encoders import encoders

    assert cached_encoder_weights("resnet18", cache_dir=str(tmp_path)) is None
    assert cached_encoder_weights("not-an-encoder", cache_dir=str(tmp_path)) is None
    s = encoders["resnet18"]["pretrained_settings"]["imagenet"]
    snap = tmp_path / f"models--{s['repo_id'].replace('/', '--')}" / "snapshots" / s["revision"]
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    assert cached_encoder_weights("resnet18", cache_dir=str(tmp_path)) is None  # weights file still missing
    (snap / "model.safetensors").write_bytes(b"x")
    assert cached_encoder_weights("resnet18", cache_dir=str(tmp_path)) == "imagenet"


def test_train_with_each_recipe_records_it(tmp_path, sample_svs, sample_geojson):
    with make_project(tmp_path / "p", sample_svs, sample_geojson) as proj:
        res = train(proj, TrainOptions(epochs=2, max_steps=6, val_fraction=0.2, seed=0), **TINY)
        paper = train(proj, TrainOptions(epochs=1, max_steps=2, recipe="paper", seed=0), from_model="latest")
        rows = {r.id: r for r in proj.models.list()}
    assert res.status == paper.status == "done"
    hp = json.loads(rows[res.model_id].hparams)
    assert hp["recipe"] == "default" and hp["lr"] is None
    assert json.loads(rows[paper.model_id].hparams)["recipe"] == "paper"
    # the best epoch is the one with the highest validation IoU under the default recipe
    hist = res.history
    best = max(hist, key=lambda h: (h["val_macro_iou"], -h["epoch"]))
    assert res.best_epoch == best["epoch"]
    assert json.loads(rows[res.model_id].config)["encoder_weights"] is None  # nothing cached for this encoder


def test_a_continued_run_starts_at_a_tenth_of_the_rate_without_warm_up(tmp_path, sample_svs, sample_geojson):
    default = get_recipe("default")
    opt = make_optimizer(default, [torch.nn.Parameter(torch.zeros(1))], None, None, continuing=True)
    sched = make_scheduler(default, opt, 10, continuing=True)
    assert sched is not None and opt.param_groups[0]["lr"] == pytest.approx(default.lr / 10)  # step 0: the peak
    fresh = make_optimizer(default, [torch.nn.Parameter(torch.zeros(1))], None, None)
    make_scheduler(default, fresh, 100)
    assert fresh.param_groups[0]["lr"] < default.lr / 4  # from scratch: warm-up first
    with make_project(tmp_path / "p", sample_svs, sample_geojson) as proj:
        first = train(proj, TrainOptions(epochs=2, max_steps=6, val_fraction=0.2, seed=0), **TINY)
        again = train(proj, TrainOptions(epochs=1, max_steps=4, val_fraction=0.2, seed=0), from_model="latest")
        chosen = train(proj, TrainOptions(epochs=1, max_steps=2, lr=3e-3, seed=0), from_model="latest")
        hp = {r.id: json.loads(r.hparams) for r in proj.models.list()}
    assert hp[first.model_id]["peak_lr"] == pytest.approx(default.lr)
    assert hp[again.model_id]["peak_lr"] == pytest.approx(default.lr / 10)
    assert hp[chosen.model_id]["peak_lr"] == pytest.approx(3e-3)  # a rate the user set is kept
    # the continued run's rate only falls: its last epoch ends below its peak, never above it
    assert 0 < again.history[-1]["lr"] < default.lr / 10
    assert first.history[0]["lr"] > again.history[-1]["lr"]


def test_time_budget_stops_training(tmp_path, sample_svs, sample_geojson):
    with make_project(tmp_path / "p", sample_svs, sample_geojson) as proj:
        res = train(proj, TrainOptions(epochs=50, max_seconds=0.01, val_fraction=0.2, seed=0), **TINY)
    assert res.status == "done" and len(res.history) == 1 and res.history[0]["steps"] >= 1
