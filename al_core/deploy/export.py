"""Export a torch segmentation model to ONNX with its inference settings and check parity with torch.

The legacy TorchScript exporter (``dynamo=False``) is used: about a second, one self-contained file, and the
same ONNX Runtime speed as the dynamo exporter (DESIGN section 8).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from al_core import __version__
from al_core._guards import check_output
from al_core._io import atomic_path
from al_core.deploy.config import META_PREFIX, InferenceConfig, normalise
from al_core.errors import ExportError

#: keys of ``metadata`` passed to :func:`export_onnx` that are not :class:`InferenceConfig` fields
EXTRA_KEYS = ("metrics", "training", "source")


@dataclass(frozen=True)
class ParityReport:
    """ONNX Runtime vs torch on the same inputs."""

    max_abs_diff: float
    mean_abs_diff: float
    atol: float
    n_inputs: int

    @property
    def ok(self) -> bool:
        """Whether the largest difference is within ``atol``."""
        return self.max_abs_diff <= self.atol


def build_metadata(config: InferenceConfig, extra: Mapping[str, Any] | None = None) -> dict[str, str]:
    """All ``metadata_props`` of an export: the config fields, extras and the slideloop version (JSON)."""
    props = config.to_metadata()
    for k, v in (extra or {}).items():
        props[META_PREFIX + k] = json.dumps(v, default=str)
    props[META_PREFIX + "slideloop_version"] = json.dumps(__version__)
    props[META_PREFIX + "exported_at"] = json.dumps(_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    return props


def export_onnx(
    module: Any,
    path: str | os.PathLike[str],
    metadata: Mapping[str, Any] | InferenceConfig,
    *,
    opset: int = 17,
    check_inputs: npt.NDArray[np.float32] | None = None,
    atol: float = 1e-3,
) -> ParityReport | None:
    """Export ``module`` (a torch ``nn.Module`` taking NCHW float input) to ``path`` atomically.

    ``metadata`` is an :class:`InferenceConfig` or a mapping of its fields plus optional ``metrics``,
    ``training`` and ``source`` entries; everything is written to ``metadata_props`` as JSON strings under
    ``slideloop.<key>``. Batch, height and width are dynamic. With ``check_inputs`` (NCHW float32,
    already normalised) the file is checked against torch before it replaces ``path``: a mismatch above
    ``atol`` raises :class:`ExportError` and leaves no file.
    """
    import onnx
    import torch

    check_output(path, what="ONNX model")
    if isinstance(metadata, InferenceConfig):
        config, extra = metadata, {}
    else:
        extra = {k: metadata[k] for k in EXTRA_KEYS if k in metadata}
        config = InferenceConfig.from_dict({k: v for k, v in metadata.items() if k not in EXTRA_KEYS}, "metadata")
        if config.ignored:
            raise ExportError(f"metadata: unknown key(s) {', '.join(config.ignored)}")
    if config.layout != "NCHW":
        raise ExportError("torch models are exported NCHW; set layout='NCHW'")
    if opset < 17:
        raise ExportError(f"opset {opset} is too old; use 17 or newer")
    w, h = config.input_size
    was_training = bool(getattr(module, "training", False))
    module.eval()
    dummy = torch.zeros(1, 3, h, w, dtype=torch.float32)
    try:
        with atomic_path(path) as tmp:
            try:
                with torch.no_grad(), warnings.catch_warnings():
                    # the legacy exporter is chosen on purpose (one file, ~1 s): its deprecation notice is noise
                    warnings.simplefilter("ignore", DeprecationWarning)
                    torch.onnx.export(
                        module, (dummy,), str(tmp), dynamo=False, opset_version=opset,
                        input_names=["input"], output_names=["output"],
                        dynamic_axes={"input": {0: "batch", 2: "height", 3: "width"},
                                      "output": {0: "batch", 2: "height", 3: "width"}},
                    )
            except Exception as err:  # the exporter raises many types for unsupported modules
                raise ExportError(f"{path}: ONNX export failed ({type(err).__name__}: {err})") from err
            model = onnx.load(str(tmp))
            for k, v in build_metadata(config, extra).items():
                entry = model.metadata_props.add()
                entry.key, entry.value = k, v
            model.producer_name = "slideloop"
            model.producer_version = __version__
            onnx.checker.check_model(model)
            onnx.save(model, str(tmp))
            report = None
            if check_inputs is not None:
                report = check_parity(module, tmp, check_inputs, atol=atol, output=config.output)
                if not report.ok:
                    raise ExportError(f"{path}: ONNX Runtime differs from torch by up to {report.max_abs_diff:.3g} "
                                      f"(tolerance {atol:g})")
    finally:
        if was_training:
            module.train()
    return report


def check_parity(
    module: Any,
    onnx_path: str | os.PathLike[str],
    inputs: npt.NDArray[np.float32],
    *,
    atol: float = 1e-3,
    output: int | str = 0,
    batch_size: int = 4,
) -> ParityReport:
    """Run ``inputs`` (NCHW float32) through torch and ONNX Runtime (CPU) and compare the outputs."""
    import onnxruntime as ort
    import torch

    if inputs.ndim != 4:
        raise ValueError(f"parity inputs must be NCHW, got shape {inputs.shape}")
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    out_names = [o.name for o in sess.get_outputs()]
    out_name = out_names[output] if isinstance(output, int) else output
    max_d = 0.0
    sum_d = 0.0
    count = 0
    module.eval()
    for i in range(0, len(inputs), batch_size):
        x = np.ascontiguousarray(inputs[i:i + batch_size], dtype=np.float32)
        with torch.no_grad():
            ref = module(torch.from_numpy(x))
        if isinstance(ref, tuple | list):
            ref = ref[output if isinstance(output, int) else 0]
        ref_np = ref.detach().cpu().numpy()
        got = sess.run([out_name], {name: x})[0]
        if got.shape != ref_np.shape:
            raise ExportError(f"{onnx_path}: ONNX output shape {got.shape} != torch {ref_np.shape}")
        d = np.abs(got.astype(np.float64) - ref_np)
        max_d = max(max_d, float(d.max()))
        sum_d += float(d.sum())
        count += d.size
    return ParityReport(max_d, sum_d / max(1, count), atol, len(inputs))


def normalise_patches(patches: npt.NDArray[np.uint8], config: InferenceConfig) -> npt.NDArray[np.float32]:
    """RGB uint8 ``(N, H, W, 3)`` patches → the model's NCHW float input under ``config`` (no preprocess step)."""
    return normalise(patches, config)
