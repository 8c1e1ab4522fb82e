"""The training panel's service: start, follow and cancel training jobs through :mod:`al_core.jobs`.

No widgets here. Everything shown comes from the project store (the job row the Dask worker writes, the model
rows :func:`al_core.train.train` writes), never from this object, so a browser refresh or a kernel restart
shows a run that is still going. The only thing held here is the Dask client, made on first use.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from al_core.project import jobs
from al_core.project.project import Project
from al_core.project.schema import JobRow, ModelRow

if TYPE_CHECKING:
    from distributed import Client

#: encoders offered in the panel: the CPU default, the GPU default, and a tiny one for quick rounds and tests
ENCODERS = ("resnet18", "resnet34", "tu-mobilenetv3_small_050")
#: default epochs when continuing from a model (the loop's usual round) and for a new model
RETRAIN_EPOCHS = 1
NEW_MODEL_EPOCHS = 2
#: the default recipe's peak learning rates (al_core.learn.recipe) for a new model and a continued one; kept
#: as numbers here so the dashboard's kernel does not import torch to draw a text box
NEW_MODEL_LR = 1e-3
RETRAIN_LR = 1e-4
#: the per-model metrics shown (keys of a ModelRow's ``metrics``: the best epoch of the run), with titles
METRICS = (("val_macro_iou", "val IoU"), ("val_macro_dice", "val Dice"), ("val_pixel_accuracy", "val pixel acc"),
           ("val_loss", "val loss"), ("train_loss", "train loss"))
#: metrics where lower is better (the comparison colours a drop as an improvement)
LOWER_IS_BETTER = {"val_loss", "train_loss"}


@dataclass(frozen=True)
class TrainSettings:
    """What the panel lets the user set; the rest keeps :class:`al_core.train.TrainOptions`' defaults.

    Defaults suit a 2-core CPU on the bundled sample (256 px patches as gridded): resnet18, two epochs for a
    new model, one (:data:`RETRAIN_EPOCHS`) to continue from the last model after corrections, which keeps the
    loop from "save" to "queue re-ranked" under a minute there (``bench/bench_loop.py``)."""

    encoder: str = "resnet18"
    epochs: int = NEW_MODEL_EPOCHS
    batch_size: int = 4
    lr: float = NEW_MODEL_LR
    augment: bool = True
    #: continue from this model version (its encoder and weights); ``None`` trains a new model
    from_model: int | None = None
    #: cap on optimizer steps over the whole run (``None``: no cap)
    max_steps: int | None = None

    def job_params(self) -> dict[str, Any]:
        """The ``train`` job's parameters; validated here (TrainOptions) so a typo fails before it queues."""
        from al_core.learn.train import TrainOptions

        options: dict[str, Any] = {"epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr, "augment": self.augment,
                   "max_steps": self.max_steps}
        TrainOptions(**options)
        params: dict[str, Any] = {"options": options, "predict": True}
        if self.from_model is not None:
            params["from_model"] = self.from_model
        else:
            params["encoder"] = self.encoder
        return params


@dataclass(frozen=True)
class RunView:
    """One training job as the panel shows it."""

    job_id: int
    status: str
    #: ``train`` or ``predict`` while running
    stage: str
    #: place in the shared queue (0 = running now); ``None`` when unknown or finished
    position: int | None
    epoch: int
    epochs: int
    step: int
    steps_per_epoch: int
    loss: float | None
    done_steps: int
    #: 0 while the number of steps is not known yet (before the first step)
    total_steps: int
    elapsed: float | None
    remaining: float | None
    model_id: int | None
    parent_id: int | None
    history: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    cancel_requested: bool = False

    @property
    def active(self) -> bool:
        """Whether the job is still queued or running."""
        return self.status in jobs.ACTIVE

    @property
    def fraction(self) -> float:
        """Share of the run done (training steps; prediction counts as the last 10 %)."""
        if self.status == "done":
            return 1.0
        if self.stage == "predict":
            return 0.9
        if not self.total_steps:
            return 0.0
        return 0.9 * min(1.0, self.done_steps / self.total_steps)


@dataclass(frozen=True)
class ModelSummary:
    """One model version for the version table."""

    id: int
    parent_id: int | None
    status: str
    encoder: str
    created_at: str
    best_epoch: int | None
    metrics: dict[str, Any]
    wall_time: float | None
    error: str | None


class TrainingService:
    """Start / cancel / follow the project's training jobs on the Dask cluster (``al_core.jobs``)."""

    def __init__(self, project: Project, author: str = "reviewer",
                 connect: Callable[[], Client] = jobs.connect) -> None:
        self.project = project
        self.author = author
        self._connect = connect
        self._client: Client | None = None
        self._lock = threading.Lock()

    # --- the cluster ----------------------------------------------------------------------------------
    @property
    def client(self) -> Client:
        """The Dask client, connected on first use (a LocalCluster takes seconds: not at page load)."""
        with self._lock:
            if self._client is None:
                self._client = self._connect()
            return self._client

    @property
    def connected(self) -> bool:
        """Whether the Dask client has been made."""
        return self._client is not None

    def close(self) -> None:
        """Close the Dask client, if one was made."""
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    # --- actions ---------------------------------------------------------------------------------------
    def start(self, settings: TrainSettings) -> int:
        """Queue a training run (then prediction of every patch); returns the job id."""
        params = settings.job_params()
        if self.active_job() is not None:
            raise RuntimeError("a training run of this project is already queued or running; wait or cancel it")
        return jobs.submit(self.project, "train", params, client=self.client, author=self.author)

    def cancel(self, job_id: int) -> None:
        """Ask a job to stop: a queued one never starts, a running one stops at its next step."""
        jobs.cancel(self.project, job_id)

    def reap_lost(self, grace_s: float = 30.0) -> list[int]:
        """Mark failed the queued/running jobs the (shared) scheduler does not know (it restarted); ``grace_s``
        spares a job another kernel has just submitted. Only sound with a shared scheduler."""
        return jobs.mark_lost(self.project, self.client, grace_s)

    # --- what the store says -----------------------------------------------------------------------
    def train_jobs(self) -> list[JobRow]:
        """The project's training jobs, oldest first."""
        return jobs.jobs(self.project, kind="train")

    def active_job(self) -> JobRow | None:
        """The newest queued or running training job, if any."""
        return next((j for j in reversed(self.train_jobs()) if j.status in jobs.ACTIVE), None)

    def current_job(self) -> JobRow | None:
        """The run to show: a queued/running one if any, else the newest."""
        rows = self.train_jobs()
        return next((j for j in reversed(rows) if j.status in jobs.ACTIVE), rows[-1] if rows else None)

    def view(self, job: JobRow | int, with_position: bool = True) -> RunView:
        """The job's state for display; its queue position asks the scheduler (only once connected)."""
        if isinstance(job, int):
            job = jobs.job(self.project, job)
        progress: dict[str, Any] = json.loads(job.progress or "{}")
        result: dict[str, Any] = json.loads(job.result or "{}")
        params: dict[str, Any] = json.loads(job.params or "{}")
        options = params.get("options", {})
        epochs = int(progress.get("epochs") or options.get("epochs") or 1)
        position = None
        if with_position and job.status in jobs.ACTIVE and self.connected:
            try:
                position = jobs.status(self.project, job.id, self.client).position
            except OSError:  # the scheduler went away: the row still tells the rest
                position = None
        model = self._model_of(job, result)
        history: list[dict[str, Any]] = json.loads(model.history or "[]") if model else []
        epoch, step = int(progress.get("epoch") or 0), int(progress.get("step") or 0)
        spe = int(progress.get("steps_per_epoch") or 0)
        if progress.get("event") == "epoch" and history:
            spe = spe or int(history[-1].get("steps") or 0)
        done_steps = int(history[-1]["steps"]) if history and progress.get("event") == "epoch" else (
            (max(epoch, 1) - 1) * spe + step if spe else 0)
        total = epochs * spe
        if options.get("max_steps"):
            total = min(total, int(options["max_steps"])) if total else 0
        now = time.time()
        end = job.finished or now
        elapsed = end - job.started if job.started else None
        remaining = None
        if job.status == "running" and elapsed and done_steps and total and progress.get("stage") != "predict":
            remaining = max(0.0, elapsed / done_steps * (total - done_steps))
        return RunView(job.id, job.status, str(progress.get("stage") or ("train" if job.started else "")), position,
                       epoch, epochs, step, spe, _float(progress.get("loss")), done_steps, total, elapsed, remaining,
                       model.id if model else result.get("model_id"),
                       model.parent_id if model else params.get("from_model"), history, _short_error(job.error),
                       bool(job.cancel_requested))

    def _model_of(self, job: JobRow, result: dict[str, Any]) -> ModelRow | None:
        """The model version a train job made (the job row links it as soon as the model row exists)."""
        model_id = job.model_id if job.model_id is not None else result.get("model_id")
        return self.project.models.get(int(model_id)) if model_id is not None else None

    def models(self) -> list[ModelSummary]:
        """Every model version for the version table, oldest first."""
        out = []
        for r in self.project.models.list():
            metrics = json.loads(r.metrics or "{}")
            out.append(ModelSummary(r.id, r.parent_id, r.status, json.loads(r.config or "{}").get("encoder", "?"),
                                    r.created_at, metrics.get("epoch"), metrics, r.wall_time, _short_error(r.error)))
        return out

    def comparison(self, model_id: int, baseline: int | None) -> list[tuple[str, float | None, float | None]]:
        """(metric title, baseline value, new value) for :data:`METRICS`: how a run moved the numbers against
        its parent (or, for a fresh model, against the model that ranked the queue before it)."""
        by_id = {m.id: m for m in self.models()}
        new = by_id.get(model_id)
        old = by_id.get(baseline) if baseline is not None else None
        if new is None:
            return []
        return [(key, _float(old.metrics.get(key)) if old else None, _float(new.metrics.get(key)))
                for key, _ in METRICS]


def _float(value: Any) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def _short_error(error: str | None) -> str | None:
    """The error's first line (the worker stores the traceback after it, for the CLI and logs)."""
    if not error:
        return None
    return error.strip().splitlines()[0]
