"""How to run an ONNX segmentation model: :class:`InferenceConfig`, and where it is read from.

A config comes from our own export (``slideloop.*`` keys in the ONNX ``metadata_props``), from a small
JSON/TOML file, or from FastPathology's model text format (``key=value`` lines). It is checked against the
model itself (:func:`check_against_model`) so a mismatch is an error naming the file, not a crash inside
ONNX Runtime.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from al_core.errors import SlideloopError

#: prefix of our keys in an ONNX model's ``metadata_props``
META_PREFIX = "slideloop."
#: the ImageNet statistics most pretrained encoders expect
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ACTIVATIONS = ("softmax", "sigmoid", "none")
LAYOUTS = ("NCHW", "NHWC")
_PALETTE = ("#000000", "#c80000", "#00a000", "#0050c8", "#c8c800", "#c800c8", "#00c8c8", "#808080")


class ModelConfigError(SlideloopError, ValueError):
    """A model file or its inference config is unusable; the message names the file and the problem."""

    def __init__(self, source: str | os.PathLike[str], problem: str) -> None:
        self.source = str(source)
        self.problem = problem
        super().__init__(f"{self.source}: {problem}")


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
    model pixel (or ``magnification``, 10/mpp; or a plain ``downsample``). Output number ``output`` (index
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
        names = {c.name.lower(): c.index for c in self.classes}
        return names.get("background", min(c.index for c in self.classes))

    def with_overrides(self, **kw: Any) -> InferenceConfig:
        """A copy with the given fields replaced (None values are ignored)."""
        return replace(self, **{k: v for k, v in kw.items() if v is not None})

    # --- (de)serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
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
        return _number(value)
    if key in ("target_mpp", "magnification", "downsample"):
        return None if value is None else _number(value)
    if key == "overlap":
        return int(value)
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
        return ClassSpec(i, c, _PALETTE[i % len(_PALETTE)])
    if isinstance(c, Mapping):
        return ClassSpec(int(c.get("index", i)), str(c["name"]), str(c.get("color") or _PALETTE[i % len(_PALETTE)]))
    raise ValueError(f"class {i}: expected a name or {{index, name, color}}, got {c!r}")


def _number(v: Any) -> float:
    """A float from a number or a fraction string such as ``1/255``."""
    if isinstance(v, str) and "/" in v:
        a, b = v.split("/", 1)
        return float(a) / float(b)
    return float(v)


# --- FastPathology ----------------------------------------------------------------------------------

#: FastPathology keys we use; everything else in such a file is reported in ``ignored``
_FP_KEYS = ("input_img_size_x", "input_img_size_y", "nb_classes", "class_names", "class_colors",
            "magnification_level", "patch_overlap", "mean", "std", "model_name", "scale_factor",
            "threshold", "resolution", "input_node", "output_node", "mask_threshold")


def parse_fastpathology(text: str, source: str | os.PathLike[str] = "model.txt") -> InferenceConfig:
    """Parse FastPathology's model text format (``key=value`` lines, ``;``-separated lists).

    ``patch_overlap`` below 1 is a fraction of the patch, otherwise pixels; ``magnification_level`` is the
    objective (10 → 1.0 µm/px). Keys we cannot use (``pipeline``, ``cnn_type``, …) are listed in ``ignored``.
    """
    kv: dict[str, str] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if "=" not in line:
            raise ModelConfigError(source, f"line {n}: expected key=value, got {line!r}")
        k, v = line.split("=", 1)
        kv[k.strip().lower()] = v.strip()
    if "input_img_size_x" not in kv and "input_img_size_y" not in kv:
        raise ModelConfigError(source, "not a FastPathology model file (no input_img_size_x/input_img_size_y)")
    try:
        w = int(float(kv.get("input_img_size_x") or kv["input_img_size_y"]))
        h = int(float(kv.get("input_img_size_y") or w))
        names = [s.strip() for s in re.split(r"[;,]", kv.get("class_names", "")) if s.strip()]
        n = int(kv.get("nb_classes", len(names) or 2))
        if names and len(names) != n:
            raise ValueError(f"nb_classes={n} but class_names lists {len(names)}")
        names = names or [f"Class {i}" for i in range(n)]
        colors = [_fp_color(c) for c in kv.get("class_colors", "").split(";") if c.strip()]
        classes = [{"index": i, "name": nm, "color": colors[i] if i < len(colors) else _PALETTE[i % len(_PALETTE)]}
                   for i, nm in enumerate(names)]
        ov = _number(kv.get("patch_overlap", 0))
        overlap = round(ov * min(w, h)) if 0 < ov < 1 else int(ov)
        data: dict[str, Any] = {"input_size": (w, h), "classes": classes, "overlap": overlap,
                                "model_name": kv.get("model_name", "")}
        data["activation"] = "softmax" if n > 1 else "sigmoid"
        if "magnification_level" in kv:
            data["magnification"] = _number(kv["magnification_level"])
        if "mean" in kv:
            data["mean"] = [float(x) for x in re.split(r"[;,\s]+", kv["mean"]) if x]
        if "std" in kv:
            data["std"] = [float(x) for x in re.split(r"[;,\s]+", kv["std"]) if x]
        if "scale_factor" in kv:
            data["scale"] = _number(kv["scale_factor"])
        if "threshold" in kv:
            data["threshold"] = _number(kv["threshold"])
        if "mask_threshold" in kv:  # FastPathology: the tissue fraction a patch needs
            data["min_tissue"] = _number(kv["mask_threshold"])
        if _is_number(kv.get("resolution", "")):  # µm/px; FastPathology's "high"/"low" levels are not scales
            data["target_mpp"] = _number(kv["resolution"])
        if "output_node" in kv and kv["output_node"]:
            data["output"] = kv["output_node"]
        cfg = InferenceConfig.from_dict(data, source)
    except ModelConfigError:
        raise
    except (ValueError, KeyError, ZeroDivisionError) as err:
        raise ModelConfigError(source, f"invalid FastPathology model file: {err}") from err
    ignored = tuple(sorted(k for k in kv if k not in _FP_KEYS or (k == "resolution" and not _is_number(kv[k]))))
    return replace(cfg, ignored=ignored)


def _is_number(v: str) -> bool:
    try:
        _number(v)
        return True
    except (ValueError, ZeroDivisionError):
        return False


def _fp_color(c: str) -> str:
    c = c.strip()
    if c.startswith("#"):
        return c.lower()
    r, g, b = (int(float(x)) for x in re.split(r"[,\s]+", c)[:3])
    return f"#{r:02x}{g:02x}{b:02x}"


# --- loading ---------------------------------------------------------------------------------------


def load_config(path: str | os.PathLike[str]) -> InferenceConfig:
    """Read a config file: ``.json``, ``.toml``, or FastPathology ``key=value`` text (any other suffix)."""
    p = Path(path)
    if not p.is_file():
        raise ModelConfigError(p, "config file not found")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ModelConfigError(p, f"cannot read config ({err})") from err
    suffix = p.suffix.lower()
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ModelConfigError(p, f"not valid JSON ({err})") from err
    elif suffix == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10: the same parser as the tomli package
            try:
                import tomli as tomllib  # type: ignore[no-redef]
            except ImportError:
                raise ModelConfigError(p, "reading TOML on Python 3.10 needs the 'tomli' package; "
                                          "or give the config as JSON") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ModelConfigError(p, f"not valid TOML ({err})") from err
    else:
        return parse_fastpathology(text, p)
    if not isinstance(data, Mapping):
        raise ModelConfigError(p, "expected a table/object of settings at the top level")
    return InferenceConfig.from_dict(data.get("inference", data), p)


def read_onnx_metadata(model_path: str | os.PathLike[str]) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file, without loading external weights."""
    import onnx

    p = Path(model_path)
    if not p.is_file():
        raise ModelConfigError(p, "model file not found")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as err:  # onnx raises DecodeError/RuntimeError/etc. for non-ONNX bytes
        raise ModelConfigError(p, f"not an ONNX model ({type(err).__name__}: {err})") from err
    if not model.graph.node and not model.graph.input:
        raise ModelConfigError(p, "not an ONNX model (no graph)")
    return {e.key: e.value for e in model.metadata_props}


def check_against_model(cfg: InferenceConfig, inputs: Sequence[Any], outputs: Sequence[Any],
                        source: str | os.PathLike[str]) -> tuple[str, str]:
    """Check ``cfg`` fits an ORT session's inputs/outputs; return (input name, output name).

    Fixed dims of the model must equal the config's: 3 channels at the layout's channel axis, and the
    patch height/width where the model is not dynamic.
    """
    if len(inputs) != 1:
        raise ModelConfigError(source, f"expected a model with one image input, it has {len(inputs)}")
    inp = inputs[0]
    shape = list(inp.shape)
    if len(shape) != 4:
        raise ModelConfigError(source, f"input {inp.name!r} has shape {shape}; expected 4-D {cfg.layout}")
    if "float" not in str(inp.type):
        raise ModelConfigError(source, f"input {inp.name!r} is {inp.type}; only float inputs are supported")
    c_ax, h_ax, w_ax = (1, 2, 3) if cfg.layout == "NCHW" else (3, 1, 2)
    w, h = cfg.input_size
    for ax, want, what in ((c_ax, 3, "channels"), (h_ax, h, "height"), (w_ax, w, "width")):
        got = shape[ax]
        if isinstance(got, int) and got > 0 and got != want:
            raise ModelConfigError(source, f"input {inp.name!r} shape {shape} has {got} {what} at axis {ax}, "
                                           f"the config ({cfg.layout}, {w}x{h}, 3 channels) needs {want}")
    if isinstance(cfg.output, int):
        if not 0 <= cfg.output < len(outputs):
            raise ModelConfigError(source, f"output {cfg.output} does not exist (model has {len(outputs)})")
        out = outputs[cfg.output]
    else:
        by_name = {o.name: o for o in outputs}
        if cfg.output not in by_name:
            raise ModelConfigError(source, f"output {cfg.output!r} not found; outputs: {sorted(by_name)}")
        out = by_name[cfg.output]
    if len(out.shape) != 4:
        raise ModelConfigError(source, f"output {out.name!r} has shape {out.shape}; expected 4-D")
    n_out = out.shape[c_ax]
    if isinstance(n_out, int) and n_out > 0:
        try:
            cfg.channel_classes(n_out)
        except ValueError as err:
            raise ModelConfigError(source, str(err)) from err
    return inp.name, out.name
