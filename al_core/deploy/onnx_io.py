"""Reading model settings: config files, an ONNX file's metadata, and a check of a config against the model."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from al_core.deploy.config import InferenceConfig
from al_core.deploy.fastpathology import parse_fastpathology
from al_core.errors import ModelConfigError


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
                import tomli as tomllib  # type: ignore[no-redef,import-not-found,unused-ignore]
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
