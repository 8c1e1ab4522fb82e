"""Train a U-Net on a project's labelled patches and store it as a model version.

Wiring over pure pieces: the data (:mod:`.dataset`), the model (:mod:`.model`, :mod:`.checkpoint`), the loop
(:mod:`.fit`), and the recipe (:mod:`.recipe`: loss, optimizer, schedule, augmentation; ``default`` or the
seed paper's ``paper``). A patch-level validation split, early stopping on the recipe's validation figure, the best checkpoint written atomically after every improvement. Every run is
a row in the ``models`` table (parent, config, label versions, hyper-parameters, per-epoch history, metrics,
wall time, status), so an interrupted or cancelled run leaves the earlier models and its own best epoch intact.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import torch

from al_core.errors import NoGridError, TrainingError
from al_core.learn.checkpoint import Checkpoint, load_checkpoint, load_weights, save_checkpoint
from al_core.learn.dataset import PatchDataset, label_masks, open_cache
from al_core.learn.device import autocast_dtype, pick_device, precision_name
from al_core.learn.fit import Cancel, FitSettings, Progress, ProgressFn, fit
from al_core.learn.losses import median_frequency_weights
from al_core.learn.model import (
    CPU_DEFAULT_ENCODER,
    GPU_DEFAULT_ENCODER,
    ModelConfig,
    build_model,
    check_classes,
    config_for,
)
from al_core.learn.promote import evaluate_and_promote
from al_core.learn.recipe import (
    RecipeAugment,
    cached_encoder_weights,
    get_recipe,
    make_criterion,
    make_optimizer,
    make_scheduler,
)
from al_core.project.models import ModelRef
from al_core.project.reaper import this_process
from al_core.project.scale import ModelScale, config_scale, training_scale
from al_core.project.schema import ModelRow
from al_core.project.validation import fixed_split, region_of

if TYPE_CHECKING:
    from al_core.project.project import Project
    from al_core.wsi.grid import GridSpec

log = logging.getLogger(__name__)

__all__ = ["Cancel", "Progress", "ProgressFn", "TrainOptions", "TrainResult", "split_indices", "train"]


@dataclass(frozen=True)
class TrainOptions:
    """Training settings. ``max_steps`` caps optimizer steps over the whole run (quick rounds, tests);
    ``precision``: ``auto`` (bf16 where native, fp16/bf16 on CUDA), ``fp32``, ``bf16`` or ``fp16`` (CUDA);
    ``recipe`` names a :mod:`~al_core.learn.recipe` (``lr``/``weight_decay`` ``None``: the recipe's);
    ``max_seconds`` caps the training wall time (the schedule decays within it)."""

    epochs: int = 20
    batch_size: int = 4
    lr: float | None = None
    weight_decay: float | None = None
    val_fraction: float = 0.2
    patience: int = 5
    seed: int | None = 0
    max_steps: int | None = None
    augment: bool = True
    class_weights: bool = False
    device: str = "auto"
    precision: str = "auto"
    recipe: str = "default"
    max_seconds: float | None = None

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.patience < 1:
            raise ValueError("epochs, batch size and patience must be at least 1")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if (self.lr is not None and self.lr <= 0) or (self.weight_decay is not None and self.weight_decay < 0):
            raise ValueError("lr must be > 0 and weight_decay >= 0")
        if self.max_seconds is not None and self.max_seconds <= 0:
            raise ValueError("max_seconds must be > 0")
        get_recipe(self.recipe)
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError("max_steps must be at least 1")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")


@dataclass
class TrainResult:
    """A finished (or cancelled) run: the model version it made and how it went."""

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
    #: the scale the model was trained at (:class:`~al_core.project.scale.ModelScale` as plain data)
    scale: dict[str, Any] | None = None
    #: the new version against the active one on the fixed validation set (:mod:`al_core.learn.promote`)
    evaluation: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain data (the checkpoint as a string)."""
        d = asdict(self)
        d["checkpoint"] = str(self.checkpoint) if self.checkpoint else None
        return d


@dataclass
class _Data:
    ids: list[int]
    images: npt.NDArray[np.uint8]
    masks: npt.NDArray[np.uint8]


def split_indices(n: int, val_fraction: float, seed: int | None) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Seeded (train, validation) index split of ``n`` patches; at least one of each when ``n >= 2``."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = int(round(val_fraction * n))
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def train(project: Project, options: TrainOptions | None = None, *, from_model: ModelRef = None,
          encoder: str | None = None, encoder_weights: str | None = None, encoder_depth: int = 5,
          decoder_channels: tuple[int, ...] | None = None, progress: ProgressFn | None = None,
          cancel: Cancel | None = None, on_model: Callable[[int], None] | None = None) -> TrainResult:
    """Train on the labelled patches of ``project``'s current grid and store the result as a new model version.

    ``from_model`` (``"latest"`` or an id) continues from that model's checkpoint: its weights and Adam state
    (incremental retraining); ``encoder``/``encoder_depth``/``decoder_channels`` shape a new model (depth 3
    with narrow decoder channels makes a tiny model for quick tests). ``on_model`` is told the new model id as
    soon as its row exists. Raises :class:`TrainingError` when there is nothing sensible to train on.
    """
    opts = options or TrainOptions()
    t0 = time.perf_counter()
    notes: list[str] = []

    def report(p: Progress) -> None:
        if p.event == "note":
            notes.append(p.message)
            log.warning(p.message)
        if progress is not None:
            progress(p)

    recipe = get_recipe(opts.recipe)
    if from_model is None and encoder_weights is None and recipe.pretrained_if_cached:
        encoder_weights = cached_encoder_weights(encoder or (GPU_DEFAULT_ENCODER if torch.cuda.is_available()
                                                             else CPU_DEFAULT_ENCODER))
    encoder_weights = None if encoder_weights == "none" else encoder_weights
    parent, ckpt, config = _start(project, from_model, encoder, encoder_weights, encoder_depth, decoder_channels)
    data = _training_data(project, config)
    train_idx, val_idx = _fixed_split(project, data, opts)
    if not len(val_idx):
        report(Progress("note", message="no validation patches: early stopping and the best checkpoint follow "
                                         "the training loss"))
    device = pick_device(opts.device)
    amp = autocast_dtype(device, opts.precision)
    model, optimizer = _model_and_optimizer(config, ckpt, f"model {parent.id if parent else '?'}", opts, device,
                                            report)
    weight = (median_frequency_weights(data.masks[train_idx], config.num_classes, config.ignore_index).to(device)
              if opts.class_weights else None)
    criterion = make_criterion(recipe, config.ignore_index, weight)
    model_id = _open_row(project, parent, config, opts, data, train_idx, val_idx, device, amp)
    if on_model is not None:
        on_model(model_id)
    ckpt_file = project.models.folder(model_id) / "model.pt"
    report(Progress("start", message=f"model {model_id}: {len(train_idx)} train / {len(val_idx)} val patches, "
                                     f"{config.encoder} on {device} ({precision_name(amp)}) at "
                                     f"{_config_scale(config).describe()}"))
    saved: list[bool] = []

    def on_epoch(entry: dict[str, Any], improved: bool) -> None:
        if improved:
            save_checkpoint(ckpt_file, model, config, optimizer,
                            extra={"model_id": model_id, "epoch": entry["epoch"], "monitor": entry.get(
                                "val_loss", entry["train_loss"])})
            saved.append(True)
        _record_epoch(project, model_id, entry, improved, ckpt_file)

    train_ds, val_ds = _datasets(data, train_idx, val_idx, opts)
    settings = FitSettings(opts.epochs, opts.batch_size, opts.patience, device, amp, opts.max_steps, opts.seed,
                           opts.max_seconds, recipe.monitor)
    total = opts.epochs * -(-len(train_ds) // opts.batch_size)
    scheduler = make_scheduler(recipe, optimizer, min(total, opts.max_steps or total), opts.max_seconds,
                               continuing=ckpt is not None)
    try:
        outcome = fit(model, optimizer, criterion, train_ds, val_ds, config, settings, on_epoch=on_epoch,
                      report=report, cancel=cancel, scheduler=scheduler)
    except BaseException as err:
        _finish(project, model_id, "failed", t0, error=f"{type(err).__name__}: {err}")
        raise
    if outcome.status == "cancelled":
        report(Progress("note", message=f"training cancelled; model {model_id} keeps its best finished epoch"
                        if saved else f"training cancelled before an epoch finished; model {model_id} has no "
                                      "checkpoint"))
    wall = _finish(project, model_id, outcome.status, t0)
    evaluation = None
    if outcome.status == "done" and saved:
        evaluation = evaluate_and_promote(project, model_id, ckpt_file, data.images[val_idx], data.masks[val_idx],
                                          device)
        report(Progress("note", message=f"model {model_id} {'is now active' if evaluation.promoted else 'was kept back'}"
                                        f": {evaluation.reason}"))
    result = TrainResult(model_id, outcome.status, ckpt_file if saved else None, outcome.best.get("epoch"),
                         outcome.best, outcome.history, wall, str(device), precision_name(amp),
                         notes + [n for n in outcome.notes if n not in notes], _config_scale(config).to_dict(),
                         evaluation.to_dict() if evaluation else None)
    report(Progress("end", metrics=outcome.best, message=outcome.status))
    return result


def _start(project: Project, from_model: ModelRef, encoder: str | None, encoder_weights: str | None,
           encoder_depth: int, decoder_channels: tuple[int, ...] | None,
           ) -> tuple[ModelRow | None, Checkpoint | None, ModelConfig]:
    """The parent model (if continuing), its checkpoint, and the new model's config."""
    spec = project.grid_spec()
    if spec is None:
        raise NoGridError(f"{project.root}: no patch grid yet; cut one before training")
    scale = _grid_scale(project, spec)
    at_scale: dict[str, Any] = {"target_mpp": scale.mpp, "downsample": scale.downsample,
                                "uncalibrated": not scale.calibrated}
    if from_model is None:
        return None, None, replace(config_for(project.classes(), spec, encoder=encoder,
                                              encoder_weights=encoder_weights, encoder_depth=encoder_depth,
                                              decoder_channels=decoder_channels), **at_scale)
    parent = project.models.resolve(from_model)
    src = project.models.checkpoint(parent)
    ckpt = load_checkpoint(src)
    check_classes(ckpt.config, project.classes(), src)
    if encoder is not None and encoder != ckpt.config.encoder:
        raise TrainingError(f"model {parent.id} uses encoder {ckpt.config.encoder!r}: continue it with that "
                            f"encoder, or train a new model with {encoder!r}")
    # fully convolutional: the weights carry over to a new grid's patch size
    config = replace(ckpt.config, patch=spec.patch, grid=spec.to_dict(), encoder_weights=None, **at_scale)
    return parent, ckpt, config


def _fixed_split(project: Project, data: _Data, opts: TrainOptions
                 ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Training and validation positions into ``data``: the project's fixed validation set, grown with newly
    labelled patches (:func:`al_core.project.validation.fixed_split`)."""
    by_id = {p.id: p for p in project.patches()}
    split = fixed_split(project.store, [by_id[i] for i in data.ids], opts.val_fraction, opts.seed)
    return np.asarray(split.train, dtype=np.int64), np.asarray(split.val, dtype=np.int64)


def _config_scale(config: ModelConfig) -> ModelScale:
    scale = config_scale(config.target_mpp, config.downsample, config.uncalibrated)
    assert scale is not None  # _start always sets one
    return scale


def _grid_scale(project: Project, spec: GridSpec) -> ModelScale:
    """The µm/px (or uncalibrated downsample) the current grid reads its slides at: the model's scale."""
    downsamples = {p.slide_id: p.downsample for p in project.patches()}
    return training_scale(spec, project.slides(), downsamples)


def _training_data(project: Project, config: ModelConfig) -> _Data:
    """Pixels and masks of the labelled patches; refuses a set with fewer than two classes."""
    labelled = sorted(project.labelled_patch_ids())
    if not labelled:
        raise TrainingError(f"{project.root}: no labelled patches in the current grid; import labels or "
                            "correct some patches first")
    cache = open_cache(project)
    images = cache.get(labelled)
    masks = label_masks([cache.patch(p) for p in labelled], project.labels.annotations, config)
    counts = np.bincount(masks[masks != config.ignore_index].ravel(), minlength=config.num_classes)
    if (counts > 0).sum() < 2:
        only = [config.class_names[i] for i in np.flatnonzero(counts)] or ["none (all pixels ignored)"]
        raise TrainingError(f"{project.root}: only one class ({', '.join(only)}) is present in the "
                            f"{len(labelled)} labelled patches; label some pixels of another class first")
    return _Data(labelled, images, masks)


def _datasets(data: _Data, train_idx: npt.NDArray[np.int64], val_idx: npt.NDArray[np.int64],
              opts: TrainOptions) -> tuple[PatchDataset, PatchDataset]:
    aug = RecipeAugment(get_recipe(opts.recipe), seed=opts.seed) if opts.augment else None
    return (PatchDataset(data.images[train_idx], data.masks[train_idx], [data.ids[i] for i in train_idx], aug),
            PatchDataset(data.images[val_idx], data.masks[val_idx], [data.ids[i] for i in val_idx]))


def _model_and_optimizer(config: ModelConfig, ckpt: Checkpoint | None, source: str, opts: TrainOptions,
                         device: torch.device, report: ProgressFn) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    if opts.seed is not None:
        torch.manual_seed(opts.seed)
    model = build_model(config)
    if ckpt is not None:
        load_weights(model, ckpt, source, expected=config)
    # Module.to takes memory_format at run time; torch's type stubs do not list it
    model.to(device=device, memory_format=torch.channels_last)  # type: ignore[call-overload]
    recipe = get_recipe(opts.recipe)
    continuing = ckpt is not None
    optimizer = make_optimizer(recipe, model.parameters(), opts.lr, opts.weight_decay, continuing)
    if ckpt is not None and ckpt.optimizer is not None:
        try:
            optimizer.load_state_dict(ckpt.optimizer)
        except (ValueError, KeyError) as err:
            report(Progress("note", message=f"the parent's optimizer state was not reused ({err})"))
        for group in optimizer.param_groups:  # this run's settings win over the saved ones
            group["lr"] = recipe.base_lr(continuing) if opts.lr is None else opts.lr
            group["weight_decay"] = recipe.weight_decay if opts.weight_decay is None else opts.weight_decay
            group["initial_lr"] = group["lr"]  # the schedule scales this run's rate, not the parent's
            if "decoupled_weight_decay" in group:  # a parent saved by Adam would turn AdamW back into Adam
                group["decoupled_weight_decay"] = recipe.optimizer == "adamw"
    return model, optimizer


def _open_row(project: Project, parent: ModelRow | None, config: ModelConfig, opts: TrainOptions, data: _Data,
              train_idx: npt.NDArray[np.int64], val_idx: npt.NDArray[np.int64], device: torch.device,
              amp: torch.dtype | None) -> int:
    """The new model version's row (status ``training``); returns its id."""
    peak = opts.lr if opts.lr is not None else get_recipe(opts.recipe).base_lr(continuing=parent is not None)
    hparams = asdict(opts) | {"device": str(device), "precision": precision_name(amp), "peak_lr": peak,
                              "train_patches": len(train_idx), "val_patches": len(val_idx)}
    label_versions = {s.name: project.labels.version(s.id) for s in project.slides()}
    pid, host = this_process()  # a run whose process dies is then noticed (al_core.project.reaper)
    with project.store.write() as s:
        row = ModelRow(parent_id=parent.id if parent else None, status="training", pid=pid, host=host,
                       config=json.dumps(config.to_dict()), label_versions=json.dumps(label_versions),
                       hparams=json.dumps(hparams),
                       patches=json.dumps({"train": [data.ids[i] for i in train_idx],
                                           "val": [data.ids[i] for i in val_idx],
                                           # the fixed validation set as slide regions (survives a new grid)
                                           "val_regions": [list(region_of(project.patch(data.ids[i])))
                                                           for i in val_idx]}))
        s.add(row)
        s.flush()
        return row.id


def _record_epoch(project: Project, model_id: int, entry: dict[str, Any], improved: bool, ckpt_file: Path) -> None:
    with project.store.write() as s:
        r = s.get(ModelRow, model_id)
        assert r is not None
        history = json.loads(r.history or "[]") + [entry]
        r.history = json.dumps(history)
        if improved:
            r.checkpoint = ckpt_file.relative_to(project.root).as_posix()
            r.metrics = json.dumps(entry)


def _finish(project: Project, model_id: int, status: str, t0: float, error: str | None = None) -> float:
    wall = round(time.perf_counter() - t0, 3)
    with project.store.write() as s:
        r = s.get(ModelRow, model_id)
        assert r is not None
        r.status = status
        r.wall_time = wall
        r.error = error
        r.finished_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return wall
