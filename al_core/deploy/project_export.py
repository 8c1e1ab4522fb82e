"""Export a project's model version: its ONNX file with the settings a deployment needs, optionally pushed."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from al_core._guards import check_output
from al_core.deploy.config import InferenceConfig
from al_core.deploy.export import EXTRA_KEYS, ParityReport, export_onnx, normalise_patches
from al_core.deploy.onnx_io import read_onnx_metadata
from al_core.deploy.registry import DeployedModel, json_or_str, push_model
from al_core.errors import ExportError, UnknownScaleError
from al_core.project.models import ModelRef
from al_core.project.scale import config_scale, same_scale
from al_core.project.schema import ModelRow

if TYPE_CHECKING:
    from al_core.learn.model import ModelConfig
    from al_core.project.project import Project


@dataclass(frozen=True)
class ExportResult:
    """An exported model version: the file, the settings read back from it, the parity check, the push."""

    path: Path
    config: InferenceConfig
    parity: ParityReport | None
    model_id: int
    deployed: DeployedModel | None = None


def export_project_model(
    proj: Project,
    model_ref: ModelRef,
    out: str | os.PathLike[str],
    *,
    push: str | None = None,
    overwrite: bool = False,
    overlap: int | None = None,
    parity_patches: int = 4,
    atol: float = 1e-3,
    mpp: float | None = None,
    downsample: float | None = None,
) -> ExportResult:
    """Export a trained model version of a project (``"active"``, ``"latest"`` or its id) to ONNX at ``out``.

    The inference config comes from the checkpoint's :class:`~al_core.learn.model.ModelConfig` (classes,
    patch, normalisation, scale) and the model row (version, metrics). Parity is checked on up to
    ``parity_patches`` real patches of the project's grid (none if the project has no grid). ``push`` also
    copies the file into the project's registry under that name. The model runs at the scale it was trained
    at; ``mpp`` or ``downsample`` gives it for a model trained before scales were recorded (a model without a
    known scale is refused: it would run at whatever the slide's own scale is).
    """
    from al_core.learn.checkpoint import load_model

    check_output(out, what="ONNX model")
    row = proj.models.resolve(model_ref)
    module, mcfg = load_model(proj.models.checkpoint(row))
    metadata = _metadata(proj, row, mcfg, overlap) | _scale_metadata(row.id, mcfg, mpp, downsample)
    sample = None
    patches = proj.patches()[:parity_patches] if proj.grid_id() is not None else []
    if patches:
        rgb = np.stack([proj.read_patch(p) for p in patches])
        cfg = InferenceConfig.from_dict({k: v for k, v in metadata.items() if k not in EXTRA_KEYS})
        sample = normalise_patches(rgb, cfg)
    report = export_onnx(module, out, metadata, check_inputs=sample, atol=atol)
    deployed = push_model(proj.root, out, push, overwrite=overwrite) if push else None
    return ExportResult(Path(out), InferenceConfig.from_metadata(read_onnx_metadata(out), out), report, row.id,
                        deployed)


def _metadata(proj: Project, row: ModelRow, mcfg: ModelConfig, overlap: int | None) -> dict[str, Any]:
    """The export's ``metadata_props``: inference settings from the model config, provenance from the row."""
    classes = [{"index": i, "name": n, "color": c}
               for i, n, c in zip(mcfg.class_idx, mcfg.class_names, mcfg.class_colors, strict=True)]
    if 0 not in mcfg.class_idx:  # pixels no channel claims (outside tissue) need a class
        classes.insert(0, {"index": 0, "name": "Background", "color": "#000000"})
    grid_overlap = int(mcfg.grid.get("overlap", mcfg.patch // 4)) if mcfg.grid else mcfg.patch // 4
    metadata: dict[str, Any] = {
        "input_size": mcfg.patch, "mean": list(mcfg.mean), "std": list(mcfg.std), "scale": 1.0 / 255.0,
        "activation": "softmax", "classes": classes, "output_classes": list(mcfg.class_idx),
        "overlap": overlap if overlap is not None else min(grid_overlap, mcfg.patch // 2),
        "model_name": f"{Path(proj.root).resolve().name}-model-{row.id}", "model_version": str(row.id),
        "metrics": json_or_str(row.metrics or "{}"),
        "training": {"created_at": row.created_at, "finished_at": row.finished_at,
                     "label_versions": json_or_str(row.label_versions or "{}"), "encoder": mcfg.encoder,
                     "encoder_depth": mcfg.encoder_depth, "grid": mcfg.grid, "parent_id": row.parent_id},
        "source": {"project": str(Path(proj.root).resolve()), "checkpoint": str(row.checkpoint)},
    }
    return metadata


def _scale_metadata(model_id: int, mcfg: ModelConfig, mpp: float | None, downsample: float | None) -> dict[str, Any]:
    """``target_mpp``/``downsample``/``uncalibrated`` of the export: the training scale, or the one given."""
    if mpp is not None and downsample is not None:
        raise ValueError("give the model's µm/px or its downsample, not both")
    known = config_scale(mcfg.target_mpp, mcfg.downsample, mcfg.uncalibrated)
    if known is None and mpp is None and downsample is None:
        raise UnknownScaleError(f"model {model_id} has no recorded training scale (it was trained before "
                                "slideloop recorded one); say which µm/px or downsample it was trained at")
    if known is not None and (mpp is not None or downsample is not None):
        given, mine = (mpp, known.mpp) if mpp is not None else (downsample, known.downsample)
        if mine is None or given is None or not same_scale(given, mine):
            asked = f"{mpp:g} µm/px" if mpp is not None else f"downsample {downsample:g}"
            raise ExportError(f"model {model_id} was trained at {known.describe()}; exporting it at {asked} "
                              "would run it at another scale than it learned")
    if known is None:
        return {"target_mpp": mpp, "downsample": downsample, "uncalibrated": mpp is None}
    if known.calibrated:
        return {"target_mpp": known.mpp, "downsample": None, "uncalibrated": False}
    return {"target_mpp": None, "downsample": known.downsample, "uncalibrated": True}
