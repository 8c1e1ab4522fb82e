"""Inference runs of deployed models on project slides: ``<project>/inference/<run id>/`` with its outputs and
``run.json``.

``run.json`` is written last (atomically), so a folder without it is a run in progress or a failed one and is
never served. The tile server looks runs up by id and serves only the files ``run.json`` names inside the
run's own folder: URLs carry ids and file kinds, never paths.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from al_core._guards import project_writes
from al_core._io import atomic_write_bytes
from al_core.errors import ProjectError

if TYPE_CHECKING:
    from al_core.deploy.infer import InferenceResult
    from al_core.deploy.registry import DeployedModel
    from al_core.project.schema import SlideRow

RUNS_DIR = "inference"
RUN_FILE = "run.json"
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
#: downloadable outputs of a run: kind in the URL → content type
FILE_TYPES = {"tiff": "image/tiff", "geojson": "application/geo+json", "report": "application/json"}


@dataclass(frozen=True)
class InferenceRun:
    """A finished run: where it lives and what ``run.json`` says about it."""

    id: str
    dir: Path
    info: dict[str, Any]

    @property
    def slide_id(self) -> int | None:
        """The ID of the project slide it segmented."""
        return self.info.get("slide_id")

    @property
    def model(self) -> str:
        """The deployed model's name."""
        return str(self.info.get("model", ""))

    @property
    def created(self) -> str:
        """When the run was made (ISO time, UTC; empty if unknown)."""
        return str(self.info.get("created", ""))

    def file(self, kind: str) -> Path:
        """The output of ``kind`` (see :data:`FILE_TYPES`); ProjectError unless the run has it in its folder."""
        name = self.info.get("files", {}).get(kind) if kind in FILE_TYPES else None
        if not name:
            raise ProjectError(f"run {self.id} has no {kind!r} output")
        path = (self.dir / str(name)).resolve()
        # a hand-edited run.json must not reach outside the run's own folder
        if path.parent != self.dir.resolve() or not path.is_file():
            raise ProjectError(f"run {self.id}: its {kind} output is missing")
        return path


def runs_root(project_root: str | os.PathLike[str]) -> Path:
    """The project's folder of inference runs (``<project>/inference``)."""
    return Path(project_root) / RUNS_DIR


def new_run_id() -> str:
    """A sortable, unguessable-enough id: UTC time plus random hex (two runs in one second do not clash)."""
    return f"{_dt.datetime.now(_dt.timezone.utc):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def check_run_id(run_id: str) -> str:
    """``run_id`` if it is a well-formed id (no separators, dots or traversal), else ProjectError."""
    if not isinstance(run_id, str) or not _ID_RE.match(run_id):
        raise ProjectError(f"{run_id!r} is not an inference run id")
    return run_id


def run_dir(project_root: str | os.PathLike[str], run_id: str) -> Path:
    """The folder of run ``run_id``; ``ProjectError`` for a malformed id."""
    return runs_root(project_root) / check_run_id(run_id)


def register_run(project_root: str | os.PathLike[str], run_id: str, info: dict[str, Any]) -> InferenceRun:
    """Write ``run.json`` for the outputs already in the run's folder; from now on the run is served."""
    d = run_dir(project_root, run_id)
    info = {"id": run_id, **info}
    atomic_write_bytes(d / RUN_FILE, json.dumps(info, indent=2, default=str).encode())
    return InferenceRun(run_id, d, info)


def load_run(project_root: str | os.PathLike[str], run_id: str) -> InferenceRun:
    """A registered run; ProjectError for a malformed id, an unknown run or one still in progress."""
    d = run_dir(project_root, run_id)
    try:
        info = json.loads((d / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        raise ProjectError(f"no finished inference run {run_id!r} in the project") from None
    return InferenceRun(run_id, d, info)


def list_runs(project_root: str | os.PathLike[str], slide_id: int | None = None) -> list[InferenceRun]:
    """Finished runs, newest first; only those of ``slide_id`` when given."""
    base = runs_root(project_root)
    out = []
    for d in base.iterdir() if base.is_dir() else []:
        if not _ID_RE.match(d.name):
            continue
        try:
            run = load_run(project_root, d.name)
        except ProjectError:
            continue
        if slide_id is None or run.slide_id == slide_id:
            out.append(run)
    return sorted(out, key=lambda r: (r.created, r.id), reverse=True)


def run_id_time(run_id: str) -> str:
    """ISO time (UTC) encoded in a run id made by :func:`new_run_id`."""
    m = re.match(r"^(\d{4})(\d{2})(\d{2})-(\d{2})(\d{2})(\d{2})-", run_id)
    return f"{m[1]}-{m[2]}-{m[3]}T{m[4]}:{m[5]}:{m[6]}+00:00" if m else ""


def _names_only(report: Path, slide_name: str) -> None:
    """Rewrite a run's downloadable report with the slide's name and file names: the server's folders stay
    private (the report is served to every user of the app)."""
    data = json.loads(report.read_text())
    data["slide"] = slide_name
    for key in ("output", "report", "geojson", "probabilities"):
        if data.get(key):
            data[key] = Path(data[key]).name
    atomic_write_bytes(report, json.dumps(data, indent=2).encode())


def run_deployed(project_root: str | os.PathLike[str], model: DeployedModel, slide: SlideRow,
                 progress: Callable[[int, int], None] | None = None) -> tuple[InferenceRun, InferenceResult]:
    """Run a deployed model over a registered slide into a new run folder and register the run; a run that
    fails leaves no folder behind."""
    from al_core.deploy.infer import infer_slide  # onnxruntime loads only when a model runs

    run_id = new_run_id()
    d = run_dir(project_root, run_id)
    d.mkdir(parents=True)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", slide.name) or "slide"
    try:
        with project_writes(project_root):
            result = infer_slide(model.path, slide.path, d / f"{stem}.tiff", mpp=slide.mpp, progress=progress)
        _names_only(Path(result.report), slide.name)
        files = {"tiff": Path(result.output).name, "report": Path(result.report).name}
        if result.geojson:
            files["geojson"] = Path(result.geojson).name
        cfg = model.info.get("config") or {}
        run = register_run(project_root, run_id, {
            "model": model.name, "model_version": cfg.get("model_version"), "model_sha256": model.info.get("sha256"),
            "slide_id": slide.id, "slide": slide.name, "created": run_id_time(run_id),
            "files": files, "timings": result.timings, "patches": result.patches,
            "patches_total": result.patches_total, "class_pixels": result.class_pixels,
            "classes": cfg.get("classes", []), "providers": result.providers, "levels": result.levels,
            "model_mpp": result.model_mpp, "dimensions": list(result.dimensions),
        })
    except BaseException:
        shutil.rmtree(d, ignore_errors=True)
        raise
    return run, result
