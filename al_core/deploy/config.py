"""How to run an ONNX segmentation model: :class:`InferenceConfig` and its (de)serialisation.

A config comes from our own export (``slideloop.*`` keys in the ONNX ``metadata_props``), from a small
JSON/TOML file, or from FastPathology's model text format (:mod:`al_core.deploy.fastpathology`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from al_core.errors import ModelConfigError

#: prefix of our keys in an ONNX model's ``metadata_props``
META_PREFIX = "slideloop."


ACTIVATIONS = ("softmax", "sigmoid", "none")


LAYOUTS = ("NCHW", "NHWC")


PALETTE = ("#000000", "#c80000", "#00a000", "#0050c8", "#c8c800", "#c800c8", "#00c8c8", "#808080")


@dataclass(frozen=True)
class ClassSpec:
    """An output class: ``index`` is its value in the predicted class map (0 = background)."""

    index: int
    name: str
    color: str = "#808080"


@dataclass(frozen=True)
class InferenceConfig:
    """Everything needed to run a segmentation model over a slide.

    Input: ``input_size`` (w, h) patches in ``layout`` with channels in ``channel_order``; pixel values
    ``v`` (0–255 after ``preprocess``) become ``(v * scale - mean) / std``. Scale: ``target_mpp`` µm per
    model pixel (or ``magnification``, 10/mpp; or a plain ``downsample``, with ``uncalibrated`` set when the
    model was trained on slides without µm/px, so it has no physical scale). Output number ``output`` (index
    or name) has one channel per entry of ``output_classes`` (the class index each channel votes for);
    ``activation`` turns it into probabilities. Decision: one sigmoid channel → ``threshold``; several
    sigmoid channels → the most probable channel above ``threshold``, else background; softmax → argmax.
    """

    input_size: tuple[int, int] = (256, 256)
    layout: str = "NCHW"
    channel_order: str = "RGB"
    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    output: int | str = 0
    activation: str = "softmax"
    classes: tuple[ClassSpec, ...] = (ClassSpec(0, "Background", "#000000"), ClassSpec(1, "Foreground", "#c80000"))
    output_classes: tuple[int, ...] | None = None
    target_mpp: float | None = None
    magnification: float | None = None
    downsample: float | None = None
    uncalibrated: bool = False
    overlap: int = 32
    threshold: float = 0.5
    min_tissue: float = 0.01
    preprocess: str = "none"
    model_name: str = ""
    model_version: str = ""
    #: keys of the source file that were not understood (reported, never silently dropped)
    ignored: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        w, h = self.input_size
        if w < 16 or h < 16:
            raise ValueError(f"input size must be at least 16x16, got {w}x{h}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.channel_order not in ("RGB", "BGR"):
            raise ValueError(f"channel order must be RGB or BGR, got {self.channel_order!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if len(self.mean) != len(self.std) or len(self.mean) not in (1, 3):
            raise ValueError(f"mean and std need 1 or 3 values each, got {self.mean} and {self.std}")
        if any(s == 0 for s in self.std):
            raise ValueError("std values must be non-zero")
        if not 0 <= self.overlap < min(w, h):
            raise ValueError(f"overlap must be in [0, {min(w, h)}) px, got {self.overlap}")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")
        if not 0.0 <= self.min_tissue <= 1.0:
            raise ValueError(f"min_tissue is a fraction in [0, 1], got {self.min_tissue}")
        for name in ("target_mpp", "magnification", "downsample"):
            v = getattr(self, name)
            if v is not None and not (v > 0 and math.isfinite(v)):
                raise ValueError(f"{name} must be a positive number, got {v}")
        if self.uncalibrated and (self.mpp is not None or self.downsample is None):
            raise ValueError("an uncalibrated model has a downsample and no µm/px or magnification")
        if not all(isinstance(c, ClassSpec) for c in self.classes):
            raise TypeError("classes must be ClassSpec objects (InferenceConfig.from_dict also takes names)")
        idx = [c.index for c in self.classes]
        if len(set(idx)) != len(idx) or not self.classes:
            raise ValueError(f"class indices must be unique and non-empty, got {idx}")
        if any(i < 0 or i > 255 for i in idx):
            raise ValueError(f"class indices must fit a uint8 class map (0–255), got {idx}")
        if self.output_classes is not None and any(i not in idx for i in self.output_classes):
            raise ValueError(f"output_classes {list(self.output_classes)} name classes not in {idx}")

    # --- derived --------------------------------------------------------------------------------
    @property
    def mpp(self) -> float | None:
        """µm per model pixel: ``target_mpp``, else from ``magnification`` (40x = 0.25 µm/px)."""
        if self.target_mpp is not None:
            return self.target_mpp
        if self.magnification is not None:
            return 10.0 / self.magnification
        return None

    def channel_classes(self, n_channels: int) -> tuple[int, ...]:
        """The class index each of the model's ``n_channels`` output channels stands for."""
        if self.output_classes is not None:
            if len(self.output_classes) != n_channels:
                raise ValueError(f"output_classes has {len(self.output_classes)} entries, the model output "
                                 f"has {n_channels} channels")
            return self.output_classes
        idx = sorted(c.index for c in self.classes)
        if n_channels == 1 and len(idx) >= 2:
            return (idx[1],)  # one sigmoid channel: the foreground class
        if n_channels != len(idx):
            raise ValueError(f"the model outputs {n_channels} channels but the config has {len(idx)} classes "
                             "(set output_classes to map channels to classes)")
        return tuple(idx)

    @property
    def background_index(self) -> int:
        """The index of the class named Background (else the lowest class index)."""
        names = {c.name.lower(): c.index for c in self.classes}
        return names.get("background", min(c.index for c in self.classes))

    def with_overrides(self, **kw: Any) -> InferenceConfig:
        """A copy with the given fields replaced (None values are ignored)."""
        return replace(self, **{k: v for k, v in kw.items() if v is not None})

    # --- (de)serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The config as a plain mapping (the keys :meth:`from_dict` reads; ``ignored`` left out)."""
        d = asdict(self)
        d.pop("ignored")
        d["input_size"] = list(self.input_size)
        d["classes"] = [asdict(c) for c in self.classes]
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str | os.PathLike[str] = "config") -> InferenceConfig:
        """Build from a plain mapping (our JSON/TOML keys); unknown keys go to ``ignored``."""
        known = {f.name for f in fields(cls)} - {"ignored"}
        kw: dict[str, Any] = {}
        ignored = []
        try:
            for key, value in data.items():
                if key not in known:
                    ignored.append(key)
                    continue
                kw[key] = _coerce(key, value)
            return cls(**kw, ignored=tuple(sorted(ignored)))
        except (TypeError, ValueError, KeyError) as err:
            raise ModelConfigError(source, f"invalid inference config: {err}") from err

    def to_metadata(self) -> dict[str, str]:
        """``metadata_props`` entries: one JSON string per field under ``slideloop.<field>``."""
        return {META_PREFIX + k: json.dumps(v) for k, v in self.to_dict().items()}

    @classmethod
    def from_metadata(cls, props: Mapping[str, str], source: str | os.PathLike[str] = "model") -> InferenceConfig:
        """Read our keys back from an ONNX model's ``metadata_props``."""
        data: dict[str, Any] = {}
        known = {f.name for f in fields(cls)}
        for key, text in props.items():
            if not key.startswith(META_PREFIX) or key[len(META_PREFIX):] not in known:
                continue
            try:
                data[key[len(META_PREFIX):]] = json.loads(text)
            except json.JSONDecodeError as err:
                raise ModelConfigError(source, f"metadata {key!r} is not JSON ({err})") from err
        return cls.from_dict(data, source)


def _coerce(key: str, value: Any) -> Any:
    if key == "input_size":
        if isinstance(value, int | float):
            return (int(value), int(value))
        w, h = value
        return (int(w), int(h))
    if key in ("mean", "std"):
        return tuple(float(v) for v in (value if isinstance(value, Sequence) and not isinstance(value, str)
                                        else [value]))
    if key == "classes":
        return tuple(_class_spec(c, i) for i, c in enumerate(value))
    if key == "output_classes":
        return None if value is None else tuple(int(v) for v in value)
    if key in ("scale", "threshold", "min_tissue"):
        return parse_number(value)
    if key in ("target_mpp", "magnification", "downsample"):
        return None if value is None else parse_number(value)
    if key == "overlap":
        return int(value)
    if key == "uncalibrated":
        if not isinstance(value, bool):
            raise ValueError(f"uncalibrated must be true or false, got {value!r}")
        return value
    if key == "output":
        return int(value) if isinstance(value, int) or (isinstance(value, str) and value.isdigit()) else str(value)
    if key in ("layout", "channel_order"):
        return str(value).upper()
    if key == "activation":
        v = str(value).lower()
        return "none" if v in ("probabilities", "identity") else v
    return str(value)


def _class_spec(c: Any, i: int) -> ClassSpec:
    if isinstance(c, ClassSpec):
        return c
    if isinstance(c, str):
        return ClassSpec(i, c, PALETTE[i % len(PALETTE)])
    if isinstance(c, Mapping):
        return ClassSpec(int(c.get("index", i)), str(c["name"]), str(c.get("color") or PALETTE[i % len(PALETTE)]))
    raise ValueError(f"class {i}: expected a name or {{index, name, color}}, got {c!r}")


def parse_number(v: Any) -> float:
    """A float from a number or a fraction string such as ``1/255``."""
    if isinstance(v, str) and "/" in v:
        a, b = v.split("/", 1)
        return float(a) / float(b)
    return float(v)


def normalise(batch: npt.NDArray[np.uint8] | npt.NDArray[np.float32], config: InferenceConfig) -> npt.NDArray[np.float32]:
    """RGB ``(N, H, W, 3)`` pixel values (0–255, after any preprocessing step) → the model's input under
    ``config``: channel order, ``(v * scale - mean) / std``, and the layout."""
    x = batch.astype(np.float32, copy=False)
    if config.channel_order == "BGR":
        x = x[..., ::-1]
    mean, std = np.asarray(config.mean, np.float32), np.asarray(config.std, np.float32)
    x = ((x * np.float32(config.scale) - mean) / std).astype(np.float32, copy=False)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2) if config.layout == "NCHW" else x, dtype=np.float32)
