"""Export a torch segmentation model to ONNX with its inference settings, check parity, and push it to
the project's model registry (``<project>/deployed/<name>/``) that the deployment view lists.

The legacy TorchScript exporter (``dynamo=False``) is used: about a second, one self-contained file, and the
same ONNX Runtime speed as the dynamo exporter (DESIGN §8).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from al_core import __version__
from al_core._io import atomic_path, atomic_write_bytes
from al_core.errors import ProjectError, SlideloopError
from al_core.model_config import META_PREFIX, InferenceConfig, ModelConfigError, read_onnx_metadata

#: keys of ``metadata`` passed to :func:`export_onnx` that are not :class:`InferenceConfig` fields
EXTRA_KEYS = ("metrics", "training", "source")
DEPLOYED_DIR = "deployed"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class ExportError(SlideloopError):
    """Export failed or the exported model does not reproduce the torch model."""


@dataclass(frozen=True)
class ParityReport:
    """ONNX Runtime vs torch on the same inputs."""

    max_abs_diff: float
    mean_abs_diff: float
    atol: float
    n_inputs: int

    @property
    def ok(self) -> bool:
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
    x = patches.astype(np.float32)
    if config.channel_order == "BGR":
        x = x[..., ::-1]
    x = (x * np.float32(config.scale) - np.asarray(config.mean, np.float32)) / np.asarray(config.std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2) if config.layout == "NCHW" else x)


# --- registry ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeployedModel:
    """A pushed model: its folder, ONNX file and the metadata json written beside it."""

    name: str
    path: Path
    info: dict[str, Any]

    @property
    def config(self) -> InferenceConfig:
        return InferenceConfig.from_dict(self.info.get("config", {}), self.path)


def push_model(project_root: str | os.PathLike[str], onnx_path: str | os.PathLike[str], name: str | None = None,
               *, overwrite: bool = False) -> DeployedModel:
    """Copy an ONNX model (and its external ``.data`` file) to ``<project>/deployed/<name>/model.onnx``.

    ``model.json`` beside it holds the inference config (from the model's metadata), the source file, its
    sha256 and the push time. ``name`` defaults to the file's stem; an existing name needs ``overwrite``.
    """
    root = Path(project_root)
    if not (root / "project.db").is_file():
        raise ProjectError(f"{root}: not a slideloop project (no project.db)")
    src = Path(onnx_path)
    props = read_onnx_metadata(src)  # also rejects non-ONNX files, naming them
    name = name or src.stem
    if not _NAME_RE.match(name):
        raise ValueError(f"model name {name!r}: use letters, digits, '.', '_' or '-' (max 100)")
    dest = root / DEPLOYED_DIR / name
    if dest.exists() and not overwrite:
        raise ProjectError(f"{dest}: a model named {name!r} is already deployed (use --overwrite)")
    config = InferenceConfig.from_metadata(props, src) if any(k.startswith(META_PREFIX) for k in props) else None
    externals = _external_files(src)
    dest.mkdir(parents=True, exist_ok=True)
    with atomic_path(dest / "model.onnx") as tmp:
        shutil.copyfile(src, tmp)
    for ext in externals:
        with atomic_path(dest / ext.name) as tmp:
            shutil.copyfile(ext, tmp)
    info = {
        "name": name,
        "source": str(src.resolve()),
        "sha256": _sha256(src),
        "pushed_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": config.to_dict() if config else None,
        "metadata": {k: _json_or_str(v) for k, v in props.items()},
        "external_data": [e.name for e in externals],
    }
    atomic_write_bytes(dest / "model.json", json.dumps(info, indent=2).encode())
    return DeployedModel(name, dest / "model.onnx", info)


def list_deployed(project_root: str | os.PathLike[str]) -> list[DeployedModel]:
    """Pushed models of a project, newest first (folders without a complete push are skipped)."""
    base = Path(project_root) / DEPLOYED_DIR
    out = []
    for d in sorted(base.iterdir()) if base.is_dir() else []:
        meta, onnx_file = d / "model.json", d / "model.onnx"
        if not (meta.is_file() and onnx_file.is_file()):
            continue
        try:
            info = json.loads(meta.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, OSError):
            continue
        out.append(DeployedModel(d.name, onnx_file, info))
    return sorted(out, key=lambda m: str(m.info.get("pushed_at", "")), reverse=True)


def _external_files(src: Path) -> list[Path]:
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    model = onnx.load(str(src), load_external_data=False)
    names = {ExternalDataInfo(t).location for t in model.graph.initializer if uses_external_data(t)}
    files = []
    for n in sorted(names):
        f = src.parent / n
        if not f.is_file():
            raise ModelConfigError(src, f"external weights file {n!r} is missing beside the model")
        files.append(f)
    return files


def _sha256(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _json_or_str(v: str) -> Any:
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        return v


# --- project glue -----------------------------------------------------------------------------------


def export_project_model(
    project_root: str | os.PathLike[str],
    model_ref: int | str | None,
    out: str | os.PathLike[str],
    *,
    overlap: int | None = None,
    parity_patches: int = 4,
    atol: float = 1e-3,
) -> tuple[InferenceConfig, ParityReport | None]:
    """Export a trained model version of a project (``"latest"`` or its id) to ONNX at ``out``.

    The inference config comes from the checkpoint's :class:`~al_core.model.ModelConfig` (classes,
    patch, normalisation, scale) and the model row (version, metrics). Parity is checked on up to
    ``parity_patches`` real patches of the project's grid (none if the project has no grid).
    """
    from al_core.model import checkpoint_path, load_model, resolve_model
    from al_core.project import Project

    with Project.open(project_root) as proj:
        row = resolve_model(proj, model_ref)
        module, mcfg = load_model(checkpoint_path(proj, row))
        classes = [{"index": i, "name": n, "color": c}
                   for i, n, c in zip(mcfg.class_idx, mcfg.class_names, mcfg.class_colors, strict=True)]
        if 0 not in mcfg.class_idx:  # pixels no channel claims (outside tissue) need a class
            classes.insert(0, {"index": 0, "name": "Background", "color": "#000000"})
        grid_overlap = int(mcfg.grid.get("overlap", mcfg.patch // 4)) if mcfg.grid else mcfg.patch // 4
        metadata: dict[str, Any] = {
            "input_size": mcfg.patch, "mean": list(mcfg.mean), "std": list(mcfg.std), "scale": 1.0 / 255.0,
            "activation": "softmax", "classes": classes, "output_classes": list(mcfg.class_idx),
            "target_mpp": mcfg.target_mpp, "downsample": None if mcfg.target_mpp else mcfg.downsample,
            "overlap": overlap if overlap is not None else min(grid_overlap, mcfg.patch // 2),
            "model_name": f"{Path(proj.root).resolve().name}-model-{row.id}", "model_version": str(row.id),
            "metrics": _json_or_str(row.metrics or "{}"),
            "training": {"created_at": row.created_at, "finished_at": row.finished_at,
                         "label_versions": _json_or_str(row.label_versions or "{}"), "encoder": mcfg.encoder,
                         "encoder_depth": mcfg.encoder_depth, "grid": mcfg.grid, "parent_id": row.parent_id},
            "source": {"project": str(Path(proj.root).resolve()), "checkpoint": str(row.checkpoint)},
        }
        sample = None
        patches = proj.patches()[:parity_patches] if proj.grid_id() is not None else []
        if patches:
            rgb = np.stack([proj.read_patch(p) for p in patches])
            cfg = InferenceConfig.from_dict({k: v for k, v in metadata.items() if k not in EXTRA_KEYS})
            sample = normalise_patches(rgb, cfg)
    report = export_onnx(module, out, metadata, check_inputs=sample, atol=atol)
    return InferenceConfig.from_metadata(read_onnx_metadata(out), out), report
