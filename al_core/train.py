"""Train a U-Net on a project's labelled patches and store it as a model version.

Adam (lr 5e-5, L2 1e-4: the seed paper's settings), a patch-level validation split, early stopping on the
validation loss, the best checkpoint written atomically after every improvement. Every run is a row in the
``models`` table (parent, config, label versions, hyper-parameters, per-epoch history, metrics, wall time,
status), so an interrupted or cancelled run leaves the earlier models and its own best epoch intact.

Speed: channels_last everywhere; bf16 autocast on a CPU only when it has native bf16 (AVX512_BF16/AMX),
which is detected, never assumed; bf16 or fp16 autocast on CUDA. A CUDA out-of-memory error halves the batch
and restarts the epoch (and says so).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from al_core.augment import PaperAugment
from al_core.dataset import PatchCache, PatchDataset, label_masks
from al_core.errors import TrainingError
from al_core.metrics import confusion, scores
from al_core.model import (
    ModelConfig,
    build_model,
    check_project_classes,
    checkpoint_path,
    config_from_project,
    load_checkpoint,
    load_weights,
    preprocess,
    resolve_model,
    save_checkpoint,
)
from al_core.project import Project
from al_core.store import ModelRow

log = logging.getLogger(__name__)

MODELS_DIR = "models"
#: a cancel request: an Event (e.g. set by a "Stop" button) or a function polled between steps
Cancel = threading.Event | Callable[[], bool]


@dataclass(frozen=True)
class TrainOptions:
    """Training settings. ``max_steps`` caps optimizer steps over the whole run (quick rounds, tests);
    ``precision``: ``auto`` (bf16 where native, fp16/bf16 on CUDA), ``fp32``, ``bf16`` or ``fp16`` (CUDA)."""

    epochs: int = 20
    batch_size: int = 4
    lr: float = 5e-5
    weight_decay: float = 1e-4
    val_fraction: float = 0.2
    patience: int = 5
    seed: int | None = 0
    max_steps: int | None = None
    augment: bool = True
    class_weights: bool = False
    device: str = "auto"
    precision: str = "auto"

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.patience < 1:
            raise ValueError("epochs, batch size and patience must be at least 1")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ValueError("lr must be > 0 and weight_decay >= 0")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError("max_steps must be at least 1")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")


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


@dataclass
class TrainResult:
    model_id: int
    status: str
    checkpoint: Path | None
    best_epoch: int | None
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    wall_time: float
    device: str
    precision: str
    notes: list[str]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["checkpoint"] = str(self.checkpoint) if self.checkpoint else None
        return d


class _Cancelled(Exception):
    pass


def cpu_has_native_bf16() -> bool:
    """True if this CPU computes bf16 natively (x86 AVX512_BF16 or AMX-BF16, Arm BF16).

    ``SLIDELOOP_CPU_BF16=0/1`` overrides. Without native support bf16 is emulated and slower than fp32.
    """
    env = os.environ.get("SLIDELOOP_CPU_BF16")
    if env in ("0", "1"):
        return env == "1"
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/cpuinfo") as fh:
                for line in fh:
                    if line.startswith(("flags", "Features")):
                        flags = set(line.split(":", 1)[1].split())
                        return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
        except OSError:
            return False
    if sys.platform == "darwin":
        import subprocess

        try:
            out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True,
                                 timeout=5, check=False).stdout.strip()
            return out == "1"
        except (OSError, subprocess.SubprocessError):
            return False
    return False


def pick_device(requested: str = "auto") -> torch.device:
    """``auto`` → CUDA when available, else CPU; an explicit CUDA request without CUDA is an error."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(requested)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"device {requested!r} requested but CUDA is not available here (use --device cpu)")
    return dev


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for ``device`` (``None`` = fp32). ``auto`` uses bf16 only where it is native."""
    if precision == "fp32":
        return None
    if device.type == "cuda":
        if precision == "fp16" or (precision == "auto" and not torch.cuda.is_bf16_supported()):
            return torch.float16
        return torch.bfloat16
    if precision == "fp16":
        raise TrainingError("fp16 autocast is for CUDA; on a CPU use bf16 or fp32")
    if precision == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if cpu_has_native_bf16() else None


def median_frequency_weights(masks: np.ndarray, num_classes: int, ignore_index: int) -> torch.Tensor:
    """Median-frequency balancing: ``w_c = median(f) / f_c``, ``f_c`` = pixels of c / pixels of the patches
    that contain c (Eigen & Fergus 2015). Classes never seen get weight 0."""
    flat = masks.reshape(len(masks), -1)
    counts = np.stack([(flat == c).sum(1) for c in range(num_classes)], 1).astype(np.float64)  # (n, C)
    valid = (flat != ignore_index).sum(1).astype(np.float64)
    present = counts > 0
    denom = (valid[:, None] * present).sum(0)
    freq = np.where(denom > 0, counts.sum(0) / np.maximum(denom, 1), 0.0)
    seen = freq > 0
    w = np.zeros(num_classes)
    w[seen] = np.median(freq[seen]) / freq[seen]
    return torch.tensor(w, dtype=torch.float32)


def train(project: Project, options: TrainOptions | None = None, *, from_model: int | str | None = None,
          encoder: str | None = None, encoder_weights: str | None = None, encoder_depth: int = 5,
          decoder_channels: tuple[int, ...] | None = None, progress: ProgressFn | None = None, cancel: Cancel | None = None) -> TrainResult:
    """Train on the labelled patches of ``project``'s current grid and store the result as a new model version.

    ``from_model`` (``"latest"`` or an id) continues from that model's checkpoint: its weights and Adam state
    (incremental retraining); ``encoder``/``encoder_depth``/``decoder_channels`` shape a new model (smaller is
    faster: depth 3 with narrow decoder channels makes a tiny model for quick tests). Raises :class:`TrainingError` when there is nothing sensible to train on.
    """
    opts = options or TrainOptions()
    t0 = time.perf_counter()
    notes: list[str] = []

    def report(p: Progress) -> None:
        if p.event == "note":
            log.warning(p.message)
        if progress is not None:
            progress(p)

    def note(msg: str) -> None:
        notes.append(msg)
        report(Progress("note", message=msg))

    # --- what to train on ------------------------------------------------------------------------
    spec = project.grid_spec()
    if spec is None:
        raise TrainingError(f"{project.root}: no patch grid yet (run 'slideloop grid')")
    parent: ModelRow | None = None
    ckpt = None
    if from_model is not None:
        parent = resolve_model(project, from_model)
        src = checkpoint_path(project, parent)
        ckpt = load_checkpoint(src)
        check_project_classes(ckpt.config, project, src)
        # fully convolutional: the weights carry over to a new grid's patch size
        config = replace(ckpt.config, patch=spec.patch, target_mpp=spec.target_mpp, downsample=spec.downsample,
                         grid=spec.to_dict(), encoder_weights=None)
        if encoder is not None and encoder != config.encoder:
            raise TrainingError(f"--from model {parent.id} uses encoder {config.encoder!r}; "
                                f"drop --encoder {encoder} or train without --from")
    else:
        config = config_from_project(project, encoder=encoder, encoder_weights=encoder_weights,
                                     encoder_depth=encoder_depth, decoder_channels=decoder_channels)
    labelled = sorted(project.labelled_patch_ids())
    if not labelled:
        raise TrainingError(f"{project.root}: no labelled patches in the current grid; import labels "
                            "('slideloop labels import') or correct some patches first")
    cache = PatchCache(project)
    images = cache.get(labelled)
    masks = label_masks(project, [cache.patch(p) for p in labelled], config)
    counts = np.bincount(masks[masks != config.ignore_index].ravel(), minlength=config.num_classes)
    if (counts > 0).sum() < 2:
        only = [config.class_names[i] for i in np.flatnonzero(counts)] or ["none (all pixels ignored)"]
        raise TrainingError(f"{project.root}: only one class ({', '.join(only)}) is present in the "
                            f"{len(labelled)} labelled patches; label some pixels of another class first")

    # --- split ------------------------------------------------------------------------------------
    rng = np.random.default_rng(opts.seed)
    order = rng.permutation(len(labelled))
    n_val = int(round(opts.val_fraction * len(labelled)))
    if opts.val_fraction > 0 and len(labelled) >= 2:
        n_val = min(max(n_val, 1), len(labelled) - 1)
    val_rows, train_rows = np.sort(order[:n_val]), np.sort(order[n_val:])
    if n_val == 0:
        note("no validation patches: early stopping and the best checkpoint follow the training loss")
    aug = PaperAugment(seed=opts.seed) if opts.augment else None
    train_ds = PatchDataset(images[train_rows], masks[train_rows], [labelled[i] for i in train_rows], aug)
    val_ds = PatchDataset(images[val_rows], masks[val_rows], [labelled[i] for i in val_rows])

    # --- model, optimizer, loss -------------------------------------------------------------------
    device = pick_device(opts.device)
    amp = autocast_dtype(device, opts.precision)
    if opts.seed is not None:
        torch.manual_seed(opts.seed)
    model = build_model(config)
    if ckpt is not None and parent is not None:
        load_weights(model, ckpt, checkpoint_path(project, parent), expected=config)
    model.to(device=device, memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
    if ckpt is not None and ckpt.optimizer is not None:
        try:
            optimizer.load_state_dict(ckpt.optimizer)
        except (ValueError, KeyError) as err:
            note(f"optimizer state of model {parent.id if parent else '?'} not reused ({err})")
        for group in optimizer.param_groups:  # this run's settings win over the saved ones
            group["lr"], group["weight_decay"] = opts.lr, opts.weight_decay
    weight = (median_frequency_weights(masks[train_rows], config.num_classes, config.ignore_index).to(device)
              if opts.class_weights else None)
    criterion = torch.nn.CrossEntropyLoss(weight=weight, ignore_index=config.ignore_index)
    scaler = torch.amp.GradScaler("cuda", enabled=amp is torch.float16)
    precision = "fp32" if amp is None else str(amp).replace("torch.", "").replace("bfloat16", "bf16").replace(
        "float16", "fp16")

    # --- the model version row --------------------------------------------------------------------
    hparams = asdict(opts) | {"device": str(device), "precision": precision, "train_patches": len(train_rows),
                              "val_patches": len(val_rows)}
    label_versions = {s.name: project.label_version(s.id) for s in project.slides()}
    with project.store.write() as s:
        row = ModelRow(parent_id=parent.id if parent else None, status="training",
                       config=json.dumps(config.to_dict()), label_versions=json.dumps(label_versions),
                       hparams=json.dumps(hparams),
                       patches=json.dumps({"train": [labelled[i] for i in train_rows],
                                           "val": [labelled[i] for i in val_rows]}))
        s.add(row)
        s.flush()
        model_id = row.id
    rel_ckpt = Path(MODELS_DIR) / str(model_id) / "model.pt"
    ckpt_file = project.root / rel_ckpt

    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {}
    best_loss = math.inf
    bad_epochs = 0
    steps = 0
    batch_size = opts.batch_size
    status = "failed"
    saved = False
    gen = torch.Generator().manual_seed(opts.seed if opts.seed is not None else int(time.time()))

    def cancelled() -> bool:
        if cancel is None:
            return False
        return cancel.is_set() if isinstance(cancel, threading.Event) else bool(cancel())

    def autocast() -> torch.autocast:
        return torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None)

    report(Progress("start", message=f"model {model_id}: {len(train_rows)} train / {len(val_rows)} val patches, "
                                     f"{config.encoder} on {device} ({precision})"))
    try:
        for epoch in range(1, opts.epochs + 1):
            te = time.perf_counter()
            while True:  # one epoch; repeated with a smaller batch after a CUDA out-of-memory error
                loader = DataLoader(train_ds, batch_size=batch_size, shuffle=True, generator=gen)
                model.train()
                losses: list[float] = []
                try:
                    for i, batch in enumerate(loader):
                        if cancelled():
                            raise _Cancelled
                        x = preprocess(batch["image"].to(device, non_blocking=True), config).contiguous(
                            memory_format=torch.channels_last)
                        y = batch["mask"].to(device, non_blocking=True)
                        optimizer.zero_grad(set_to_none=True)
                        with autocast():
                            loss = criterion(model(x).float(), y)
                        scaler.scale(loss).backward()
                        scaler.step(optimizer)
                        scaler.update()
                        losses.append(float(loss.detach()))
                        steps += 1
                        report(Progress("step", epoch, i + 1, len(loader), losses[-1]))
                        if opts.max_steps is not None and steps >= opts.max_steps:
                            break
                    break
                except torch.cuda.OutOfMemoryError as err:
                    optimizer.zero_grad(set_to_none=True)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    if batch_size == 1:
                        raise TrainingError(f"out of memory even with batch size 1 on {device} "
                                            f"(patch {config.patch}, {config.encoder}): use a smaller encoder "
                                            "or patch size, or --device cpu") from err
                    batch_size = max(1, batch_size // 2)
                    note(f"out of memory on {device}: retrying epoch {epoch} with batch size {batch_size}")
            train_loss = float(np.mean(losses)) if losses else math.nan
            val = _evaluate(model, val_ds, config, criterion, device, autocast, batch_size) if len(val_ds) else {}
            monitor = val.get("loss", train_loss)
            entry = {"epoch": epoch, "steps": steps, "train_loss": train_loss,
                     **{f"val_{k}": v for k, v in val.items()}, "seconds": round(time.perf_counter() - te, 3)}
            improved = monitor < best_loss - 1e-7
            if improved:
                best_loss, bad_epochs = monitor, 0
                best = entry
                save_checkpoint(ckpt_file, model, config, optimizer,
                                extra={"model_id": model_id, "epoch": epoch, "monitor": monitor})
                saved = True
            else:
                bad_epochs += 1
            entry["best"] = improved
            history.append(entry)
            with project.store.write() as s:
                r = s.get(ModelRow, model_id)
                assert r is not None
                r.history = json.dumps(history)
                if improved:
                    r.checkpoint = rel_ckpt.as_posix()
                    r.metrics = json.dumps(best)
            report(Progress("epoch", epoch, len(losses), len(losses), train_loss, dict(entry)))
            if opts.max_steps is not None and steps >= opts.max_steps:
                break
            if bad_epochs >= opts.patience:
                note(f"early stop after epoch {epoch}: no improvement in {opts.patience} epoch(s)")
                break
        status = "done"
    except _Cancelled:
        status = "cancelled"
        note(f"training cancelled; model {model_id} keeps its best finished epoch"
             if saved else f"training cancelled before an epoch finished; model {model_id} has no checkpoint")
    except BaseException as err:
        _finish(project, model_id, "failed", history, best, t0, error=f"{type(err).__name__}: {err}")
        raise
    wall = _finish(project, model_id, status, history, best, t0)
    if batch_size != opts.batch_size:
        notes.append(f"batch size reduced to {batch_size} after out-of-memory errors")
    result = TrainResult(model_id, status, ckpt_file if saved else None, best.get("epoch"), best, history, wall,
                         str(device), precision, notes)
    report(Progress("end", metrics=best, message=status))
    return result


def _evaluate(model: torch.nn.Module, ds: PatchDataset, config: ModelConfig, criterion: torch.nn.Module,
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
    return {"loss": total / max(n, 1), "pixel_accuracy": sc["pixel_accuracy"], "macro_iou": sc["macro_iou"],
            "macro_dice": sc["macro_dice"]}


def _finish(project: Project, model_id: int, status: str, history: list[dict[str, Any]], best: dict[str, Any],
            t0: float, error: str | None = None) -> float:
    wall = round(time.perf_counter() - t0, 3)
    with project.store.write() as s:
        r = s.get(ModelRow, model_id)
        assert r is not None
        r.status = status
        r.history = json.dumps(history)
        r.metrics = json.dumps(best)
        r.wall_time = wall
        r.error = error
        r.finished_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return wall
