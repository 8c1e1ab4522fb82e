"""Model checkpoints: one ``torch.save`` file holding the config as plain data, the weights and (for incremental
retraining) the optimizer state; they load with ``weights_only=True``, so opening one never runs code.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from al_core._guards import check_free_space
from al_core._io import atomic_path
from al_core.errors import CheckpointError
from al_core.learn.model import ModelConfig, build_model

CHECKPOINT_FORMAT = "slideloop-model"
CHECKPOINT_VERSION = 1


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
    check_free_space(Path(path).parent, _tensor_bytes(payload), "the checkpoint")
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


def load_weights(model: torch.nn.Module, ckpt: Checkpoint, source: str | os.PathLike[str],
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


def _tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a (nested) payload: what ``torch.save`` writes, give or take its headers."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj
