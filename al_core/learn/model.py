"""The segmentation model: a segmentation-models-pytorch ``Unet`` and its frozen config.

The model's output channels are the project's trainable classes (Background first, ignore classes left out);
:attr:`ModelConfig.class_idx` maps a channel back to the project's class index. Input is RGB normalised with
``mean``/``std`` on the 0-1 scale (:func:`preprocess`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import torch

from al_core._constants import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD
from al_core._torch_compat import ensure_torchvision_importable
from al_core.errors import CheckpointError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from al_core.project.classes import ClassInfo
    from al_core.wsi.grid import GridSpec

# torchvision (via smp/timm) must be importable beside a CPU-only torch before anyone imports it
ensure_torchvision_importable()

#: defaults from DESIGN.md §8: a round trains in about a minute on 2 CPU cores with these
CPU_DEFAULT_ENCODER = "resnet18"
GPU_DEFAULT_ENCODER = "resnet34"


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model and feed it: architecture, classes, input scale and normalisation.

    ``class_idx[c]`` is the project class index predicted by output channel ``c``; ``patch`` is the side in
    pixels of the grid's patches, read at ``target_mpp`` µm/px; on slides without µm/px metadata at
    ``downsample`` from level 0 with ``uncalibrated`` set (:func:`al_core.project.scale.training_scale`).
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
    uncalibrated: bool = False
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
        """The number of output channels, one per predicted class."""
        return len(self.class_idx)

    def to_dict(self) -> dict[str, Any]:
        """The config as a plain dict (what :meth:`from_dict` reads)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Rebuild from :meth:`to_dict` output (lists become tuples; unknown keys are an error)."""
        known = set(cls.__dataclass_fields__)
        extra = set(d) - known
        if extra:
            raise ValueError(f"unknown model config keys {sorted(extra)}")
        kwargs: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**kwargs)

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


def config_for(classes: Sequence[ClassInfo], spec: GridSpec, *, encoder: str | None = None,
               encoder_weights: str | None = None, encoder_depth: int = 5,
               decoder_channels: tuple[int, ...] | None = None) -> ModelConfig:
    """A config for a project's classes on a grid (encoder default: resnet18 on CPU, resnet34 on CUDA)."""
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


def check_classes(config: ModelConfig, classes: Sequence[ClassInfo], source: str | Path) -> None:
    """Raise :class:`CheckpointError` if the model was trained for another class set than ``classes``."""
    mine = tuple((c.idx, c.name) for c in classes if not c.ignore)
    theirs = tuple(zip(config.class_idx, config.class_names, strict=True))
    if mine != theirs:
        raise CheckpointError(source, f"the model was trained for classes {list(theirs)}, the project has "
                                      f"{list(mine)}; train a new model instead of continuing this one")


def build_model(config: ModelConfig) -> torch.nn.Module:
    """The smp ``Unet`` for ``config``. Pretrained encoder weights only when ``config.encoder_weights`` is set
    (that downloads them once into torch's hub cache; nothing is downloaded otherwise)."""
    import segmentation_models_pytorch as smp

    try:
        net: torch.nn.Module = smp.Unet(encoder_name=config.encoder, encoder_weights=config.encoder_weights,
                        encoder_depth=config.encoder_depth, decoder_channels=list(config.decoder_channels),
                        in_channels=3, classes=config.num_classes)
        return net
    except KeyError as err:  # smp raises KeyError for an unknown encoder name
        raise ValueError(f"unknown encoder {config.encoder!r}: {err}") from err


def preprocess(images: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """uint8 RGB ``(N, 3, H, W)`` → float32 normalised by ``config.mean``/``std`` (0–1 scale)."""
    mean = torch.tensor(config.mean, device=images.device, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(config.std, device=images.device, dtype=torch.float32).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std
