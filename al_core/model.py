"""The segmentation model: a segmentation-models-pytorch ``Unet``, its frozen config, and checkpoints.

The model's output channels are the project's trainable classes (Background first, ignore classes left out);
:attr:`ModelConfig.class_idx` maps a channel back to the project's class index. Input is RGB normalised with
``mean``/``std`` on the 0–1 scale (:func:`preprocess`). Checkpoints are one ``torch.save`` file holding the
config as plain data, the weights and (for incremental retraining) the optimizer state; they load with
``weights_only=True``, so opening one never runs code.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import torch

from al_core._io import atomic_path
from al_core._torch_compat import ensure_torchvision_importable
from al_core.errors import CheckpointError, ProjectError, TrainingError

# torchvision (via smp/timm) must be importable beside a CPU-only torch before anyone imports it
ensure_torchvision_importable()

if TYPE_CHECKING:
    from al_core.project import Project
    from al_core.store import ModelRow

#: the value masks carry for pixels no loss or metric counts (ignore classes, unknown class indices)
IGNORE_INDEX = 255
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CHECKPOINT_FORMAT = "slideloop-model"
CHECKPOINT_VERSION = 1
#: defaults from DESIGN.md §8: a round trains in about a minute on 2 CPU cores with these
CPU_DEFAULT_ENCODER = "resnet18"
GPU_DEFAULT_ENCODER = "resnet34"


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model and feed it: architecture, classes, input scale and normalisation.

    ``class_idx[c]`` is the project class index predicted by output channel ``c``; ``patch`` is the side in
    pixels of the grid's patches, read at ``downsample`` from level 0 (``target_mpp`` µm/px where known).
    """

    class_idx: tuple[int, ...]
    class_names: tuple[str, ...]
    class_colors: tuple[str, ...]
    encoder: str = CPU_DEFAULT_ENCODER
    arch: str = "Unet"
    encoder_depth: int = 5
    decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16)
    encoder_weights: str | None = None
    patch: int = 256
    ignore_index: int = IGNORE_INDEX
    ignore_classes: tuple[int, ...] = ()
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    target_mpp: float | None = None
    downsample: float | None = None
    grid: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if len(self.class_idx) < 2:
            raise ValueError(f"a segmentation model needs at least 2 classes, got {list(self.class_names)}")
        if not len(self.class_idx) == len(self.class_names) == len(self.class_colors):
            raise ValueError("class_idx, class_names and class_colors must have the same length")
        if self.arch != "Unet":
            raise ValueError(f"unsupported architecture {self.arch!r} (supported: Unet)")
        if self.encoder_depth != len(self.decoder_channels):
            raise ValueError(f"decoder_channels needs {self.encoder_depth} entries, got {self.decoder_channels}")
        if self.patch % (2 ** self.encoder_depth):
            raise ValueError(f"patch size {self.patch} must be a multiple of {2 ** self.encoder_depth} "
                             f"(the U-Net downsamples {self.encoder_depth} times)")

    @property
    def num_classes(self) -> int:
        return len(self.class_idx)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Rebuild from :meth:`to_dict` output (lists become tuples; unknown keys are an error)."""
        known = set(cls.__dataclass_fields__)
        extra = set(d) - known
        if extra:
            raise ValueError(f"unknown model config keys {sorted(extra)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def architecture(self) -> dict[str, Any]:
        """The fields that decide the weights' shapes: two configs with equal architecture share weights."""
        return {k: getattr(self, k) for k in ("arch", "encoder", "encoder_depth", "decoder_channels")} | {
            "num_classes": self.num_classes}

    def mask_lut(self) -> npt.NDArray[np.uint8]:
        """A 256-entry table from project class index to output channel; ignore and unknown → ``ignore_index``."""
        lut = np.full(256, self.ignore_index, dtype=np.uint8)
        for ch, idx in enumerate(self.class_idx):
            lut[idx] = ch
        return lut

    def channel_to_class(self) -> npt.NDArray[np.uint8]:
        """Output channel → project class index (for argmax maps in project terms)."""
        return np.asarray(self.class_idx, dtype=np.uint8)


def config_from_project(project: Project, *, encoder: str | None = None, encoder_weights: str | None = None,
                        encoder_depth: int = 5, decoder_channels: tuple[int, ...] | None = None) -> ModelConfig:
    """A config for ``project``'s classes and current grid (encoder default: resnet18 on CPU, resnet34 on CUDA)."""
    spec = project.grid_spec()
    if spec is None:
        raise TrainingError(f"{project.root}: no patch grid yet (run 'slideloop grid')")
    classes = project.classes()
    train_classes = [c for c in classes if not c.ignore]
    if encoder is None:
        encoder = GPU_DEFAULT_ENCODER if torch.cuda.is_available() else CPU_DEFAULT_ENCODER
    decoder = decoder_channels or (256, 128, 64, 32, 16)[:encoder_depth]
    return ModelConfig(
        class_idx=tuple(c.idx for c in train_classes), class_names=tuple(c.name for c in train_classes),
        class_colors=tuple(c.color for c in train_classes), encoder=encoder, encoder_weights=encoder_weights,
        encoder_depth=encoder_depth, decoder_channels=tuple(decoder), patch=spec.patch,
        ignore_classes=tuple(c.idx for c in classes if c.ignore), target_mpp=spec.target_mpp,
        downsample=spec.downsample, grid=spec.to_dict(),
    )


def check_project_classes(config: ModelConfig, project: Project, source: str | Path) -> None:
    """Raise :class:`CheckpointError` if the model was trained for another class set than ``project``'s."""
    mine = tuple((c.idx, c.name) for c in project.classes() if not c.ignore)
    theirs = tuple(zip(config.class_idx, config.class_names, strict=True))
    if mine != theirs:
        raise CheckpointError(source, f"the model was trained for classes {list(theirs)}, the project has "
                                      f"{list(mine)}; train a new model (without --from)")


def build_model(config: ModelConfig) -> torch.nn.Module:
    """The smp ``Unet`` for ``config``. Pretrained encoder weights only when ``config.encoder_weights`` is set
    (that downloads them once into torch's hub cache; nothing is downloaded otherwise)."""
    import segmentation_models_pytorch as smp

    try:
        return smp.Unet(encoder_name=config.encoder, encoder_weights=config.encoder_weights,
                        encoder_depth=config.encoder_depth, decoder_channels=list(config.decoder_channels),
                        in_channels=3, classes=config.num_classes)
    except KeyError as err:  # smp raises KeyError for an unknown encoder name
        raise ValueError(f"unknown encoder {config.encoder!r}: {err}") from err


def preprocess(images: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """uint8 RGB ``(N, 3, H, W)`` → float32 normalised by ``config.mean``/``std`` (0–1 scale)."""
    mean = torch.tensor(config.mean, device=images.device, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(config.std, device=images.device, dtype=torch.float32).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


@dataclass
class Checkpoint:
    """A loaded checkpoint: config, weights, optimizer state (may be ``None``) and free-form ``extra``."""

    config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None
    extra: dict[str, Any]


def save_checkpoint(path: str | os.PathLike[str], model: torch.nn.Module, config: ModelConfig,
                    optimizer: torch.optim.Optimizer | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint atomically (a crash leaves the previous file, never a half-written one)."""
    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    payload = {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "config": config.to_dict(),
        "state_dict": state, "optimizer": _to_cpu(optimizer.state_dict()) if optimizer is not None else None,
        "extra": extra or {},
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Read a checkpoint; a missing, corrupt or foreign file raises :class:`CheckpointError` naming it."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(p, "checkpoint file not found")
    try:
        payload = torch.load(p, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError, OSError) as err:
        raise CheckpointError(p, f"not a readable checkpoint (corrupt or truncated file: {err})") from err
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(p, "not a slideloop model checkpoint")
    if payload.get("version", 0) > CHECKPOINT_VERSION:
        raise CheckpointError(p, f"checkpoint format {payload['version']} is newer than this slideloop reads "
                                 f"({CHECKPOINT_VERSION})")
    try:
        config = ModelConfig.from_dict(payload["config"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(p, f"invalid model config in checkpoint: {err}") from err
    return Checkpoint(config, payload["state_dict"], payload.get("optimizer"), payload.get("extra") or {})


def load_weights(model: torch.nn.Module, ckpt: Checkpoint, source: str | Path,
                 expected: ModelConfig | None = None) -> None:
    """Load ``ckpt``'s weights into ``model``; a different architecture or class set → :class:`CheckpointError`."""
    if expected is not None:
        if expected.architecture() != ckpt.config.architecture():
            raise CheckpointError(source, f"architecture {ckpt.config.architecture()} does not match the "
                                          f"requested {expected.architecture()}")
        if expected.class_idx != ckpt.config.class_idx or expected.class_names != ckpt.config.class_names:
            raise CheckpointError(source, f"the checkpoint's classes {list(ckpt.config.class_names)} differ from "
                                          f"{list(expected.class_names)}")
    try:
        model.load_state_dict(ckpt.state_dict)
    except RuntimeError as err:
        raise CheckpointError(source, f"weights do not fit the model architecture: {str(err)[:300]}") from err


def load_model(checkpoint_path: str | os.PathLike[str]) -> tuple[torch.nn.Module, ModelConfig]:
    """The model of a checkpoint, on the CPU in eval mode, and its config. Stable API (used by ONNX export)."""
    ckpt = load_checkpoint(checkpoint_path)
    # no pretrained download when rebuilding: the checkpoint holds every weight
    config = ckpt.config
    plain = ModelConfig.from_dict(config.to_dict() | {"encoder_weights": None})
    # built on the meta device and filled from the checkpoint: no time spent on a random init (~0.2 s)
    with torch.device("meta"):
        model = build_model(plain)
    try:
        model.load_state_dict(ckpt.state_dict, assign=True)
    except RuntimeError as err:
        raise CheckpointError(checkpoint_path, f"weights do not fit the model architecture: {str(err)[:300]}") from err
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):  # a tensor the checkpoint lacks
        model = build_model(plain)
        load_weights(model, ckpt, checkpoint_path)
    return model.eval(), config


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def resolve_model(project: Project, ref: int | str | None = "latest") -> ModelRow:
    """A finished model version of ``project``: ``"latest"``/``None`` (newest finished) or its id."""
    from sqlalchemy import select

    from al_core.store import ModelRow

    with project.store.read() as s:
        if ref is None or (isinstance(ref, str) and ref.lower() == "latest"):
            row = s.scalar(select(ModelRow).where(ModelRow.status == "done").order_by(ModelRow.id.desc()))
            if row is None:
                raise ProjectError(f"{project.root}: no trained model yet (run 'slideloop train')")
            return row
        try:
            mid = int(ref)
        except ValueError as err:
            raise ValueError(f"model {ref!r}: expected 'latest' or a model id") from err
        row = s.get(ModelRow, mid)
    if row is None:
        raise ProjectError(f"{project.root}: no model {mid} (see 'slideloop train' output for model ids)")
    if row.checkpoint is None:
        raise ProjectError(f"model {mid} has no checkpoint (status {row.status}: it never finished an epoch)")
    return row


def checkpoint_path(project: Project, row: ModelRow) -> Path:
    """The checkpoint file of a model row (stored relative to the project folder)."""
    if row.checkpoint is None:
        raise ProjectError(f"model {row.id} has no checkpoint (status {row.status})")
    p = Path(row.checkpoint)
    return p if p.is_absolute() else project.root / p
