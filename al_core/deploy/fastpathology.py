"""FastPathology's model text format (``key=value`` lines) read into an :class:`InferenceConfig`."""

from __future__ import annotations

import os
import re
from dataclasses import replace
from typing import Any

from al_core.deploy.config import PALETTE, InferenceConfig, parse_number
from al_core.errors import ModelConfigError

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
        classes = [{"index": i, "name": nm, "color": colors[i] if i < len(colors) else PALETTE[i % len(PALETTE)]}
                   for i, nm in enumerate(names)]
        ov = parse_number(kv.get("patch_overlap", 0))
        overlap = round(ov * min(w, h)) if 0 < ov < 1 else int(ov)
        data: dict[str, Any] = {"input_size": (w, h), "classes": classes, "overlap": overlap,
                                "model_name": kv.get("model_name", "")}
        data["activation"] = "softmax" if n > 1 else "sigmoid"
        if "magnification_level" in kv:
            data["magnification"] = parse_number(kv["magnification_level"])
        if "mean" in kv:
            data["mean"] = [float(x) for x in re.split(r"[;,\s]+", kv["mean"]) if x]
        if "std" in kv:
            data["std"] = [float(x) for x in re.split(r"[;,\s]+", kv["std"]) if x]
        if "scale_factor" in kv:
            data["scale"] = parse_number(kv["scale_factor"])
        if "threshold" in kv:
            data["threshold"] = parse_number(kv["threshold"])
        if "mask_threshold" in kv:  # FastPathology: the tissue fraction a patch needs
            data["min_tissue"] = parse_number(kv["mask_threshold"])
        if _is_number(kv.get("resolution", "")):  # µm/px; FastPathology's "high"/"low" levels are not scales
            data["target_mpp"] = parse_number(kv["resolution"])
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
        parse_number(v)
        return True
    except (ValueError, ZeroDivisionError):
        return False


def _fp_color(c: str) -> str:
    c = c.strip()
    if c.startswith("#"):
        return c.lower()
    r, g, b = (int(float(x)) for x in re.split(r"[,\s]+", c)[:3])
    return f"#{r:02x}{g:02x}{b:02x}"
