"""The deployment view's state between the widgets and :mod:`al_core`: traits only, no ipywidgets import.

Runs a pushed model (:func:`al_core.deploy.registry.list_deployed`) over a project slide
(:func:`al_core.project.runs.run_deployed`) on a background thread, so the kernel keeps answering the page (progress, other controls) while ONNX
Runtime works. Outputs go to ``<project>/inference/<run id>/`` and are registered there (:mod:`.runs`) for the
tile server once complete; a failed run leaves nothing behind.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from traitlets import Bool, Dict, HasTraits, Instance, Int, Unicode

from al_core.deploy.registry import DeployedModel, list_deployed
from al_core.errors import ScaleError, SlideloopError
from al_core.project.project import Project
from al_core.project.runs import FILE_TYPES, InferenceRun, list_runs, load_run, run_deployed
from al_core.project.schema import SlideRow
from al_core.project.uploads import add_uploaded_slide
from al_core.tiles.pyramid import Pyramid
from slideloop_apps import PROJECT_ENV
from slideloop_apps.state import tiles_root
from slideloop_apps.ui import slide_label

#: seconds between progress updates sent to the page (a large slide reports thousands of batches)
PROGRESS_EVERY = 0.1
#: the stage table's rows: (key in InferenceResult.timings, label), FastPathology's Table 2 order
STAGE_LABELS = (("patch_generation", "Patch generation"), ("input", "Input (read + preprocess)"),
                ("inference", "Inference"), ("output", "Output (probabilities)"), ("stitching", "Stitching"),
                ("tiff_export", "TIFF export"), ("geojson", "GeoJSON export"), ("total", "Total"))


class DeployState(HasTraits):
    """One user's deployment session over one project: the chosen model and slide, the run in progress and
    the result shown."""

    project = Instance(Project)
    model_name = Unicode("")
    slide_id = Int(0)
    running = Bool(False)
    #: patches done / to do in the current run (total 0 until the grid is known)
    done = Int(0)
    total = Int(0)
    #: the run whose result is shown ("" for none)
    run_id = Unicode("")
    message = Unicode("")
    level = Unicode("info")
    #: bumped when the list of models, slides or runs changes
    revision = Int(0)
    #: summary of the shown run (timings, patches, classes), from its run.json
    result = Dict()

    def __init__(self, project: Project, **kwargs: Any) -> None:
        super().__init__(project=project, **kwargs)
        self._thread: threading.Thread | None = None
        models = self.models()
        if models:
            self.model_name = models[0].name
        slides = project.slides()
        if slides:
            self.slide_id = slides[0].id
            self.show_latest_run()

    @classmethod
    def from_env(cls) -> DeployState:
        """Open the project named by ``SLIDELOOP_PROJECT`` (set by ``slideloop app``)."""
        path = os.environ.get(PROJECT_ENV)
        if not path:
            raise SlideloopError(f"no project given: start the app with 'slideloop app PROJECT --view deploy' "
                                 f"or set {PROJECT_ENV}")
        return cls(Project.open(path))

    # --- what the widgets show ---------------------------------------------------------------------
    def say(self, message: str, level: str = "info") -> None:
        """Set the message the page shows and its level (``info``, ``warning`` or ``error``)."""
        self.level = level
        self.message = message

    def models(self) -> list[DeployedModel]:
        """The project's deployed models."""
        return list_deployed(self.project.root)

    def model(self, name: str | None = None) -> DeployedModel | None:
        """The deployed model named ``name`` (default: the chosen one), or ``None``."""
        name = self.model_name if name is None else name
        return next((m for m in self.models() if m.name == name), None)

    def model_choices(self) -> list[tuple[str, str]]:
        """(label, name) of each deployed model for the model picker; the label adds its model version."""
        out = []
        for m in self.models():
            version = (m.info.get("config") or {}).get("model_version")
            out.append((f"{m.name} · version {version}" if version else m.name, m.name))
        return out

    def model_summary(self) -> str:
        """One line about the chosen model: classes, input, scale (or why it has no settings)."""
        m = self.model()
        if m is None:
            return "No model pushed yet: push one with 'slideloop push PROJECT model.onnx'."
        cfg = m.info.get("config")
        if not cfg:
            return f"{m.name}: no slideloop settings in the model (it cannot run here as pushed)."
        classes = ", ".join(c["name"] if isinstance(c, dict) else str(c) for c in cfg.get("classes", []))
        size = cfg.get("input_size")
        size = "x".join(str(v) for v in size) if isinstance(size, list | tuple) else size
        mpp, mag = cfg.get("target_mpp"), cfg.get("magnification")
        if isinstance(mpp, int | float):
            scale = f"{mpp:g} µm/px"
        elif isinstance(mag, int | float):
            scale = f"{mag:g}x"
        else:
            scale = f"downsample {cfg.get('downsample') or 1:g}" + (" (uncalibrated)" if cfg.get("uncalibrated") else "")
        return f"{size} px patches at {scale}, overlap {cfg.get('overlap', 0)} px · classes: {classes}"

    def slide_choices(self) -> list[tuple[str, int]]:
        """(name, ID) of each project slide for the slide picker."""
        return [(slide_label(r.name, r.mpp), r.id) for r in self.project.slides()]

    def pyramid(self) -> Pyramid:
        """The chosen slide's tile geometry."""
        row = self.project.slide_row(self.slide_id)
        return Pyramid(row.width, row.height)

    def slide_problem(self) -> str | None:
        """Why the chosen slide cannot be run (its file is missing), or ``None``."""
        row = self.project.slide_row(self.slide_id)
        if not Path(row.path).is_file():
            return f"The file of slide '{row.name}' is missing ({Path(row.path).name} was moved or deleted)."
        return None

    def runs(self) -> list[InferenceRun]:
        """Finished runs of the current slide, newest first."""
        return list_runs(self.project.root, self.slide_id) if self.slide_id else []

    def run_choices(self) -> list[tuple[str, str]]:
        """(UTC time · model, run ID) of the slide's finished runs, newest first, for the run picker."""
        return [(f"{r.created.replace('T', ' ')[:19]} · {r.model}", r.id) for r in self.runs()]

    def tile_urls(self) -> dict[str, str]:
        """Leaflet URL templates of the slide and, when a run is shown, its class map."""
        root = tiles_root()
        urls = {"slide": f"{root}tiles/{self.slide_id}/{{z}}/{{x}}/{{y}}.jpeg"}
        if self.run_id:
            urls["result"] = f"{root}inference/{self.run_id}/{{z}}/{{x}}/{{y}}.png"
        return urls

    def download_urls(self) -> dict[str, tuple[str, str]]:
        """Kind → (URL, file name) of the shown run's outputs."""
        if not self.run_id:
            return {}
        files = self.result.get("files", {})
        root = tiles_root()
        return {k: (f"{root}inference/{self.run_id}/files/{k}", files[k]) for k in FILE_TYPES if files.get(k)}

    # --- actions -----------------------------------------------------------------------------------
    def select_slide(self, slide_id: int) -> None:
        """Switch to a slide and show its latest result; ``ProjectError`` for an unknown ID."""
        self.project.slide_row(int(slide_id))  # ProjectError for an unknown id
        # drop the old slide's result first: its overlay must never be drawn over the new slide
        self.result = {}
        self.run_id = ""
        self.slide_id = int(slide_id)
        self.show_latest_run()
        name = self.project.slide_row(self.slide_id).name
        problem = self.slide_problem()
        if problem:
            self.say(problem, "error")
        elif self.run_id:
            when = str(self.result.get("created", "")).replace("T", " ")[:16]
            self.say(f"Showing the latest result for {name} ({self.result.get('model', '')}, {when} UTC).")
        else:
            self.say(f"No result for {name} yet: pick a model and press Run.")

    def show_latest_run(self) -> None:
        """Show the chosen slide's newest run (none: clear the result)."""
        runs = self.runs()
        self.show_run(runs[0].id if runs else "")

    def show_run(self, run_id: str) -> None:
        """Show a finished run's result ("" clears it)."""
        if not run_id:
            self.result = {}
            self.run_id = ""
            return
        run = load_run(self.project.root, run_id)
        self.result = dict(run.info)
        self.run_id = run_id

    def add_upload(self, name: str, content: bytes) -> int:
        """Save an uploaded slide file into the project and register it; its id."""
        row = add_uploaded_slide(self.project, name, content)
        self.revision += 1
        self.select_slide(row.id)
        self.say(f"Added slide '{row.name}' ({row.width} x {row.height} px"
                 f"{f', {row.mpp:.3g} µm/px' if row.mpp else ', no µm/px metadata'}).")
        return row.id

    def start(self) -> bool:
        """Start a run of the chosen model over the chosen slide on a background thread; False when one runs."""
        if self.running:
            self.say("A run is already in progress.", "warning")
            return False
        job = self._prepare()
        if job is None:
            return False
        self._thread = threading.Thread(target=job, name="slideloop-deploy-run", daemon=True)
        self._thread.start()
        return True

    def run_now(self) -> bool:
        """The same run in the calling thread (scripts, tests); True when it succeeded."""
        job = self._prepare()
        if job is None:
            return False
        job()
        return self.level != "error"

    def wait(self, timeout: float | None = None) -> None:
        """Wait up to ``timeout`` seconds (default: no limit) for the background run to end."""
        if self._thread is not None:
            self._thread.join(timeout)

    def _prepare(self) -> Callable[[], None] | None:
        """Check the choices in the kernel's thread; the job to run, or None after saying what is wrong."""
        model = self.model()
        if model is None:
            self.say("Pick a pushed model first (none is pushed to this project yet).", "error")
            return None
        if not self.slide_id:
            self.say("Pick a slide first.", "error")
            return None
        row = self.project.slide_row(self.slide_id)
        problem = self.slide_problem()
        if problem:
            self.say(problem, "error")
            return None
        self.running, self.done, self.total = True, 0, 0
        self.say(f"Running {model.name} over {row.name}…")
        return lambda: self._run(model, row)

    def _run(self, model: DeployedModel, slide: SlideRow) -> None:
        last = [0.0]

        def progress(done: int, total: int) -> None:
            now = time.monotonic()
            if done >= total or now - last[0] >= PROGRESS_EVERY:
                last[0] = now
                self.total, self.done = total, done

        try:
            run, result = run_deployed(self.project.root, model, slide, progress)
        except Exception as err:  # the user needs the reason in the page, whatever raised it
            self.running = False
            hint = (" Register the slide with its scale to run it here: 'slideloop add PROJECT FILE --mpp "
                    "<µm per pixel>'." if isinstance(err, ScaleError) and slide.mpp is None else "")
            reason = _reason(err).rstrip()
            self.say(f"The run failed: {reason}{'' if reason.endswith('.') else '.'}{hint}", "error")
            return
        self.total = self.done = max(result.patches, self.total)
        self.revision += 1
        if self.slide_id == slide.id:
            self.show_run(run.id)
        self.running = False
        self.say(f"Done: {result.patches} patches of {slide.name} in {result.timings.get('total', 0):.1f} s. "
                 "The result is on the map; the downloads and stage timings are on the right.")


def _reason(err: Exception) -> str:
    # slideloop's errors already name the file and the problem; anything else gets its type for context
    if isinstance(err, SlideloopError):
        return str(err)
    return f"{type(err).__name__}: {err}"
