"""The project's registry of deployed models (``<project>/deployed/<name>/``) that the deployment view lists."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from al_core._io import atomic_path, atomic_write_bytes
from al_core.deploy.config import META_PREFIX, InferenceConfig
from al_core.deploy.onnx_io import load_config, read_onnx_metadata
from al_core.errors import ModelConfigError, ProjectError

DEPLOYED_DIR = "deployed"


_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


@dataclass(frozen=True)
class DeployedModel:
    """A pushed model: its folder, ONNX file and the metadata json written beside it."""

    name: str
    path: Path
    info: dict[str, Any]

    @property
    def config(self) -> InferenceConfig:
        """The model's inference config, as recorded in ``model.json``."""
        return InferenceConfig.from_dict(self.info.get("config", {}), self.path)


def push_model(project_root: str | os.PathLike[str], onnx_path: str | os.PathLike[str], name: str | None = None,
               *, overwrite: bool = False, config: InferenceConfig | str | os.PathLike[str] | None = None
               ) -> DeployedModel:
    """Copy an ONNX model (and its external ``.data`` file) to ``<project>/deployed/<name>/model.onnx``.

    ``model.json`` beside it holds the inference config (from the model's metadata), the source file, its
    sha256 and the push time. ``name`` defaults to the file's stem; an existing name needs ``overwrite``. A model
    made elsewhere (no slideloop metadata) needs its ``config``: an :class:`InferenceConfig` or a config file.
    """
    root = Path(project_root)
    if not root.is_dir():
        raise ProjectError(f"{root}: no such project folder")
    src = Path(onnx_path)
    props = read_onnx_metadata(src)  # also rejects non-ONNX files, naming them
    name = name or src.stem
    if not _NAME_RE.match(name):
        raise ValueError(f"model name {name!r}: use letters, digits, '.', '_' or '-' (max 100)")
    dest = root / DEPLOYED_DIR / name
    if dest.exists() and not overwrite:
        raise ProjectError(f"{dest}: a model named {name!r} is already deployed (overwrite it or choose another name)")
    if config is not None:
        config = config if isinstance(config, InferenceConfig) else load_config(config)
    elif any(k.startswith(META_PREFIX) for k in props):
        config = InferenceConfig.from_metadata(props, src)
    else:
        raise ModelConfigError(src, "has no slideloop metadata (classes, scale, normalisation); give its inference "
                                    "config (JSON, TOML or a FastPathology model .txt)")
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
        "metadata": {k: json_or_str(v) for k, v in props.items()},
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


def json_or_str(v: str) -> Any:
    """A stored metadata value decoded from JSON, or the string itself where it is not JSON."""
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        return v
