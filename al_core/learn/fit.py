"""The fit loop: epochs of optimizer steps, validation, early stopping, and a CUDA out-of-memory retry.

It knows nothing of projects or files: the caller passes the model, the data and a callback that is told after
every epoch whether it improved (and saves the checkpoint, writes the history). Speed: channels_last inputs;
autocast in the dtype the caller chose (:func:`al_core.learn.device.autocast_dtype`).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from al_core.errors import TrainingError
from al_core.learn.dataset import PatchDataset
from al_core.learn.metrics import confusion, scores
from al_core.learn.model import ModelConfig, preprocess

#: a cancel request: an Event (e.g. set by a "Stop" button) or a function polled between steps
Cancel = threading.Event | Callable[[], bool]


@dataclass(frozen=True)
class Progress:
    """One progress report: ``event`` is ``start``, ``step``, ``epoch``, ``note`` or ``end``."""

    event: str
    epoch: int = 0
    step: int = 0
    steps_per_epoch: int = 0
    loss: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    message: str = ""


ProgressFn = Callable[[Progress], None]
#: told after each epoch: (history entry, whether it is the best so far)
EpochFn = Callable[[dict[str, Any], bool], None]


@dataclass(frozen=True)
class FitSettings:
    """How long and how: ``max_steps`` caps optimizer steps over the whole run, ``max_seconds`` its wall time;
    ``amp`` is the autocast dtype; ``monitor`` (``loss`` or ``iou``) is the validation figure that picks the best
    epoch and drives early stopping."""

    epochs: int
    batch_size: int
    patience: int
    device: torch.device
    amp: torch.dtype | None = None
    max_steps: int | None = None
    seed: int | None = 0
    max_seconds: float | None = None
    monitor: str = "loss"


@dataclass
class FitOutcome:
    """What the loop did: ``status`` is ``done`` or ``cancelled``; ``best`` is the best epoch's entry."""

    status: str
    history: list[dict[str, Any]]
    best: dict[str, Any]
    batch_size: int
    notes: list[str]


class Cancelled(Exception):
    """Raised inside the loop when the cancel request is seen."""


@dataclass
class _Run:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    criterion: torch.nn.Module
    config: ModelConfig
    settings: FitSettings
    report: ProgressFn
    is_cancelled: Callable[[], bool]
    scaler: torch.amp.GradScaler
    batch_size: int
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    steps: int = 0
    notes: list[str] = field(default_factory=list)
    t0: float = field(default_factory=time.perf_counter)

    def autocast(self) -> torch.autocast:
        amp = self.settings.amp
        return torch.autocast(self.settings.device.type, dtype=amp or torch.float32, enabled=amp is not None)

    def note(self, msg: str) -> None:
        self.notes.append(msg)
        self.report(Progress("note", message=msg))

    def step_cap_reached(self) -> bool:
        s = self.settings
        return ((s.max_steps is not None and self.steps >= s.max_steps)
                or (s.max_seconds is not None and time.perf_counter() - self.t0 >= s.max_seconds))


def cancel_check(cancel: Cancel | None) -> Callable[[], bool]:
    """A no-argument predicate for a cancel request (``None`` never cancels)."""
    if cancel is None:
        return lambda: False
    if isinstance(cancel, threading.Event):
        return cancel.is_set
    return lambda: bool(cancel())


def fit(model: torch.nn.Module, optimizer: torch.optim.Optimizer, criterion: torch.nn.Module,
        train_ds: PatchDataset, val_ds: PatchDataset, config: ModelConfig, settings: FitSettings, *,
        on_epoch: EpochFn, report: ProgressFn, cancel: Cancel | None = None,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None) -> FitOutcome:
    """Train ``model`` for up to ``settings.epochs`` epochs; early stop after ``patience`` epochs without a
    better validation figure (``settings.monitor``; the training loss when there is no validation set).
    ``scheduler`` is stepped after every optimizer step."""
    run = _Run(model, optimizer, criterion, config, settings, report, cancel_check(cancel),
               torch.amp.GradScaler("cuda", enabled=settings.amp is torch.float16), settings.batch_size, scheduler)
    gen = torch.Generator().manual_seed(settings.seed if settings.seed is not None else int(time.time()))
    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {}
    best_loss, bad_epochs = math.inf, 0
    try:
        for epoch in range(1, settings.epochs + 1):
            te = time.perf_counter()
            losses = _epoch_with_retry(run, train_ds, gen, epoch)
            train_loss = float(np.mean(losses)) if losses else math.nan
            val = evaluate(model, val_ds, config, criterion, settings.device, run.autocast, run.batch_size) \
                if len(val_ds) else {}
            monitor = _monitor(val, train_loss, settings.monitor)
            entry = {"epoch": epoch, "steps": run.steps, "train_loss": train_loss,
                     "lr": optimizer.param_groups[0]["lr"],  # at the epoch's end: the schedule, as run
                     **{f"val_{k}": v for k, v in val.items()}, "seconds": round(time.perf_counter() - te, 3)}
            improved = monitor < best_loss - 1e-7
            if improved:
                best_loss, bad_epochs, best = monitor, 0, entry
            else:
                bad_epochs += 1
            entry["best"] = improved
            history.append(entry)
            on_epoch(entry, improved)
            report(Progress("epoch", epoch, len(losses), len(losses), train_loss, dict(entry)))
            if run.step_cap_reached():
                break
            if bad_epochs >= settings.patience:
                run.note(f"early stop after epoch {epoch}: no improvement in {settings.patience} epoch(s)")
                break
        status = "done"
    except Cancelled:
        status = "cancelled"
    if run.batch_size != settings.batch_size:
        run.notes.append(f"batch size reduced to {run.batch_size} after out-of-memory errors")
    return FitOutcome(status, history, best, run.batch_size, run.notes)


def _monitor(val: dict[str, Any], train_loss: float, what: str) -> float:
    """The figure to minimise: validation loss, or minus validation macro IoU (loss when IoU is undefined)."""
    if what == "iou" and not math.isnan(val.get("macro_iou", math.nan)):
        return -float(val["macro_iou"])
    return float(val.get("loss", train_loss))


def _epoch_with_retry(run: _Run, ds: PatchDataset, gen: torch.Generator, epoch: int) -> list[float]:
    """One epoch; repeated with half the batch after a CUDA out-of-memory error."""
    while True:
        try:
            return _epoch(run, ds, gen, epoch)
        except torch.cuda.OutOfMemoryError as err:
            run.optimizer.zero_grad(set_to_none=True)
            if run.settings.device.type == "cuda":
                torch.cuda.empty_cache()
            if run.batch_size == 1:
                raise TrainingError(f"out of memory even with batch size 1 on {run.settings.device} "
                                    f"(patch {run.config.patch}, {run.config.encoder}): use a smaller encoder "
                                    "or patch size, or the CPU") from err
            run.batch_size = max(1, run.batch_size // 2)
            run.note(f"out of memory on {run.settings.device}: retrying epoch {epoch} with batch size "
                     f"{run.batch_size}")


def _epoch(run: _Run, ds: PatchDataset, gen: torch.Generator, epoch: int) -> list[float]:
    device = run.settings.device
    loader = DataLoader(ds, batch_size=run.batch_size, shuffle=True, generator=gen)
    run.model.train()
    losses: list[float] = []
    for i, batch in enumerate(loader):
        if run.is_cancelled():
            raise Cancelled
        x = preprocess(batch["image"].to(device, non_blocking=True), run.config).contiguous(
            memory_format=torch.channels_last)
        y = batch["mask"].to(device, non_blocking=True)
        run.optimizer.zero_grad(set_to_none=True)
        with run.autocast():
            loss = run.criterion(run.model(x).float(), y)
        run.scaler.scale(loss).backward()
        run.scaler.step(run.optimizer)
        run.scaler.update()
        if run.scheduler is not None:
            run.scheduler.step()
        losses.append(float(loss.detach()))
        run.steps += 1
        run.report(Progress("step", epoch, i + 1, len(loader), losses[-1]))
        if run.step_cap_reached():
            break
    return losses


def evaluate(model: torch.nn.Module, ds: PatchDataset, config: ModelConfig, criterion: torch.nn.Module,
             device: torch.device, autocast: Callable[[], torch.autocast], batch_size: int) -> dict[str, Any]:
    """Validation loss and pixel metrics (pooled confusion over the validation patches)."""
    model.eval()
    total, n = 0.0, 0
    cm = np.zeros((config.num_classes, config.num_classes), dtype=np.int64)
    with torch.inference_mode():
        for batch in DataLoader(ds, batch_size=batch_size):
            x = preprocess(batch["image"].to(device), config).contiguous(memory_format=torch.channels_last)
            y = batch["mask"].to(device)
            with autocast():
                logits = model(x).float()
            total += float(criterion(logits, y)) * len(y)
            n += len(y)
            cm += confusion(y.cpu().numpy(), logits.argmax(1).cpu().numpy(), config.num_classes, config.ignore_index)
    sc = scores(cm)
    # per-class lists (model channels) too: the Rounds view shows each class's validation IoU/Dice per round
    return {"loss": total / max(n, 1), "pixel_accuracy": sc["pixel_accuracy"], "macro_iou": sc["macro_iou"],
            "macro_dice": sc["macro_dice"], "iou": sc["iou"], "dice": sc["dice"]}
