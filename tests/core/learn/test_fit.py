"""The fit loop (al_core.learn.fit) on its own: a 1x1 convolution on generated patches, no project, no files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from al_core.errors import TrainingError
from al_core.learn import fit as fit_mod
from al_core.learn.dataset import PatchDataset
from al_core.learn.fit import FitSettings, Progress, cancel_check, fit
from al_core.learn.model import ModelConfig

CONFIG = ModelConfig(class_idx=(0, 1), class_names=("Background", "Dark"), class_colors=("#000000", "#c80000"),
                     encoder_depth=3, decoder_channels=(16, 8, 8), patch=64)


def _data(n: int, seed: int = 0) -> PatchDataset:
    """Bright pixels are class 0, dark ones class 1: a per-pixel problem a 1x1 convolution learns."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)
    masks = (images.mean(-1) < 128).astype(np.uint8)
    return PatchDataset(images, masks, list(range(n)))


def _run(settings: FitSettings, lr: float = 0.05, val: int = 4, cancel=None):
    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 2, 1)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    epochs: list[tuple[int, bool]] = []
    events: list[Progress] = []
    out = fit(model, opt, torch.nn.CrossEntropyLoss(ignore_index=255), _data(8), _data(val, seed=1), CONFIG,
              settings, on_epoch=lambda e, improved: epochs.append((e["epoch"], improved)), report=events.append,
              cancel=cancel)
    return out, epochs, events


def _settings(**kw) -> FitSettings:
    return FitSettings(**({"epochs": 5, "batch_size": 4, "patience": 2, "device": torch.device("cpu")} | kw))


def test_learns_and_reports_every_epoch():
    out, epochs, events = _run(_settings(epochs=6, patience=10))
    assert out.status == "done" and [e["epoch"] for e in out.history] == list(range(1, 7))
    assert out.history[-1]["steps"] == 12 and out.history[-1]["val_loss"] < out.history[0]["val_loss"]
    assert out.best["val_pixel_accuracy"] > 0.8 and out.best["best"] is True
    assert [e for e, _ in epochs] == list(range(1, 7)) and epochs[0] == (1, True)
    kinds = [p.event for p in events]
    assert kinds.count("step") == 12 and kinds.count("epoch") == 6
    step = next(p for p in events if p.event == "step")
    assert (step.epoch, step.step, step.steps_per_epoch) == (1, 1, 2) and step.loss > 0


def test_early_stop_when_validation_stops_improving():
    out, epochs, events = _run(_settings(epochs=10, patience=2), lr=1e-12)  # nothing moves after epoch 1
    assert [e["epoch"] for e in out.history] == [1, 2, 3]
    assert [i for _, i in epochs] == [True, False, False] and out.best["epoch"] == 1
    assert out.notes == ["early stop after epoch 3: no improvement in 2 epoch(s)"]
    assert any(p.event == "note" and p.message == out.notes[0] for p in events)


def test_step_cap_ends_mid_epoch():
    out, _, _ = _run(_settings(epochs=5, batch_size=2, max_steps=5))
    assert out.status == "done" and [e["steps"] for e in out.history] == [4, 5]


def test_without_validation_the_training_loss_decides():
    out, _, _ = _run(_settings(epochs=3, patience=5), val=0)
    assert len(out.history) == 3 and not any(k.startswith("val_") for k in out.history[0])
    assert out.best["train_loss"] == min(e["train_loss"] for e in out.history)


def test_cancel_from_a_function_polled_between_steps():
    calls: list[int] = []

    def stop() -> bool:
        calls.append(1)
        return len(calls) > 3

    out, epochs, _ = _run(_settings(epochs=5, batch_size=2), cancel=stop)
    assert out.status == "cancelled" and len(out.history) == 0 and epochs == []  # cancelled in epoch 1
    assert cancel_check(None)() is False


def test_out_of_memory_at_batch_size_one_is_a_training_error(monkeypatch):
    def no_memory(images, config):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(fit_mod, "preprocess", no_memory)
    with pytest.raises(TrainingError, match="out of memory even with batch size 1"):
        _run(_settings(epochs=1, batch_size=4))
