"""Training/prediction jobs on a Dask distributed cluster, their state in the project store.

One GPU shared by several users' kernels: every job asks for the worker resource ``GPU=1``, so a worker that
declares ``--resources GPU=1`` runs them one at a time, in submission order. Jobs are submitted with
``fire_and_forget``: a submitting kernel that dies loses nothing, the job still runs. The job's own row in the
project store (status, progress, result, error) is written by the worker, so any kernel, a browser refresh
or the CLI sees the same state. Without a scheduler address a ``LocalCluster`` (one worker process) is the
embedded default; on a hub, point every user at a shared scheduler (``SLIDELOOP_SCHEDULER``).
"""

from __future__ import annotations

import json
import os
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from al_core._constants import RESOURCE as RESOURCE
from al_core._constants import SCHEDULER_ENV as SCHEDULER_ENV
from al_core.errors import ProjectError
from al_core.project.project import Project
from al_core.project.reaper import reap, this_process
from al_core.project.schema import JobRow

if TYPE_CHECKING:
    from distributed import Client

KEY_PREFIX = "slideloop-job-"
ACTIVE = ("queued", "running")


@dataclass(frozen=True)
class JobStatus:
    """A job's state in the store; ``position`` is its place in the shared queue (0 = running now, ``None``:
    unknown), times are Unix seconds."""

    id: int
    kind: str
    status: str
    position: int | None
    progress: dict[str, Any]
    result: dict[str, Any]
    error: str | None
    submitted: float
    started: float | None
    finished: float | None


def connect(address: str | None = None) -> Client:
    """A client of the shared scheduler (``address``, or ``$SLIDELOOP_SCHEDULER``), else of a new LocalCluster."""
    from distributed import Client, LocalCluster

    address = address or os.environ.get(SCHEDULER_ENV)
    if address:
        if os.path.exists(address):  # a scheduler file (shared file system on a hub)
            return Client(scheduler_file=address, set_as_default=False)
        return Client(address, set_as_default=False)
    cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=True, resources={RESOURCE: 1},
                           dashboard_address=None)
    return Client(cluster, set_as_default=False)


def submit(project: Project, kind: str, params: dict[str, Any] | None = None, *, client: Client,
           author: str = "") -> int:
    """Record a job as queued and hand it to the cluster; returns the job id. Survives the caller's death."""
    from distributed import fire_and_forget

    if kind not in JOB_KINDS:
        raise ValueError(f"unknown job kind {kind!r} (known: {', '.join(sorted(JOB_KINDS))})")
    key = f"{KEY_PREFIX}{kind}-{uuid.uuid4().hex}"
    with project.store.write() as s:
        submitted = time.time()  # under the write lock: ids and submission times come in the same order
        row = JobRow(kind=kind, params=json.dumps(params or {}), status="queued", dask_key=key, author=author,
                     submitted=submitted)
        s.add(row)
        s.flush()
        job_id = row.id
    # Dask orders equal-priority tasks by a per-client counter, which interleaves users; an explicit priority
    # from the submission time (earlier = higher) makes the shared queue first come, first served.
    future = client.submit(run_job, str(project.root), project.store.url, job_id, key=key, pure=False,
                           resources={RESOURCE: 1}, priority=-round(submitted * 1000))
    fire_and_forget(future)
    return job_id


def run_job(project_root: str, db_url: str, job_id: int) -> str:
    """Run one job on a worker: mark it running, run its kind, store the result or the error."""
    project = Project.open(project_root, db_url=db_url)
    try:
        with project.store.write() as s:
            row = s.get(JobRow, job_id)
            if row is None:
                return "missing"
            if row.cancel_requested:
                row.status, row.finished = "cancelled", time.time()
                return "cancelled"
            row.status, row.started = "running", time.time()
            row.pid, row.host = this_process()  # a worker that dies is then noticed (reaper)
            kind, params = row.kind, json.loads(row.params)
        reporter = _Reporter(project, job_id)
        try:
            result = JOB_KINDS[kind](project, params, reporter)
            status, error = ("cancelled" if result.get("status") == "cancelled" else "done"), None
        except Exception as err:  # the job's failure is data for the user, not a worker crash
            result, status = {}, "failed"
            error = f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=8)}"
        with project.store.write() as s:
            row = s.get(JobRow, job_id)
            assert row is not None
            row.status, row.finished, row.result, row.error = status, time.time(), json.dumps(result, default=str), error
            row.progress = json.dumps(reporter.last)
        return status
    finally:
        project.close()


class _Reporter:
    """Progress into the job row (at most every ``interval`` s) and the cancel flag out of it."""

    def __init__(self, project: Project, job_id: int, interval: float = 1.0) -> None:
        self.project, self.job_id, self.interval = project, job_id, interval
        self.last: dict[str, Any] = {}
        self._written = 0.0
        self._checked = 0.0
        self._cancel = False

    def __call__(self, progress: dict[str, Any], force: bool = False) -> None:
        self.last = progress
        now = time.monotonic()
        if force or now - self._written >= self.interval:
            self._written = now
            with self.project.store.write() as s:
                row = s.get(JobRow, self.job_id)
                if row is not None:
                    row.progress = json.dumps(progress, default=str)

    def cancelled(self) -> bool:
        now = time.monotonic()
        if not self._cancel and now - self._checked >= self.interval / 2:
            self._checked = now
            with self.project.store.read() as s:
                row = s.get(JobRow, self.job_id)
                self._cancel = bool(row and row.cancel_requested)
        return self._cancel


def cancel(project: Project, job_id: int) -> None:
    """Ask a job to stop: a queued one never starts, a running one stops at its next step."""
    with project.store.write() as s:
        row = s.get(JobRow, job_id)
        if row is None:
            raise ProjectError(f"no job {job_id} in the project")
        row.cancel_requested = True


def queue_keys(client: Client) -> list[str]:
    """Keys of slideloop jobs the scheduler still has to run or is running, in the order it will run them."""

    def _on_scheduler(dask_scheduler: Any) -> list[tuple[Any, str]]:
        out = []
        for key, ts in dask_scheduler.tasks.items():
            if str(key).startswith(KEY_PREFIX) and ts.state not in ("memory", "erred", "forgotten", "released"):
                out.append((ts.priority, str(key)))
        return [(p, k) for p, k in sorted(out, key=lambda t: t[0] or ())]

    return [k for _, k in client.run_on_scheduler(_on_scheduler)]


def status(project: Project, job_id: int, client: Client | None = None) -> JobStatus:
    """A job's state; its place in the shared queue (0 = running now) when a client is given."""
    with project.store.read() as s:
        row = s.get(JobRow, job_id)
    if row is None:
        raise ProjectError(f"no job {job_id} in the project")
    position = None
    if client is not None and row.status in ACTIVE:
        keys = queue_keys(client)
        position = keys.index(row.dask_key) if row.dask_key in keys else None
    return JobStatus(row.id, row.kind, row.status, position, json.loads(row.progress or "{}"),
                     json.loads(row.result or "{}"), row.error, row.submitted, row.started, row.finished)


def job(project: Project, job_id: int) -> JobRow:
    """One job's row."""
    with project.store.read() as s:
        row = s.get(JobRow, job_id)
    if row is None:
        raise ProjectError(f"no job {job_id} in the project")
    return row


def jobs(project: Project, active_only: bool = False, kind: str | None = None) -> list[JobRow]:
    """The project's job rows, oldest first (only queued/running ones, or only one kind, when asked)."""
    reap(project)  # the queue notices jobs whose process died before it lists them
    q = select(JobRow).order_by(JobRow.id)
    if kind is not None:
        q = q.where(JobRow.kind == kind)
    if active_only:
        q = q.where(JobRow.status.in_(ACTIVE))
    with project.store.read() as s:
        return list(s.scalars(q).all())


def mark_lost(project: Project, client: Client, grace_s: float = 0.0) -> list[int]:
    """Mark failed the jobs the store says are queued/running but the scheduler does not know (it restarted, or
    the worker died). ``grace_s`` spares a job submitted that recently (its task may not have reached the
    scheduler yet). Returns the ids marked."""
    known = set(queue_keys(client))  # before reading the rows: a job finishing meanwhile is done, not lost
    now = time.time()
    suspects = [j.id for j in jobs(project, active_only=True) if j.dask_key not in known and now - j.submitted > grace_s]
    lost = []
    if suspects:
        with project.store.write() as s:
            for jid in suspects:
                row = s.get(JobRow, jid)
                if row is not None and row.status in ACTIVE:
                    row.status, row.finished = "failed", now
                    row.error = "lost: the compute engine stopped before the job finished; submit it again"
                    lost.append(jid)
    return lost


def job_model(project: Project, job_id: int) -> int | None:
    """The model version a train job made (known as soon as its row exists)."""
    with project.store.read() as s:
        row = s.get(JobRow, job_id)
        return row.model_id if row is not None else None


def _link_model(project: Project, job_id: int) -> Callable[[int], None]:
    def link(model_id: int) -> None:
        with project.store.write() as s:
            row = s.get(JobRow, job_id)
            if row is not None:
                row.model_id = model_id

    return link


# --- job kinds --------------------------------------------------------------------------------------

JobFn = Callable[[Project, dict[str, Any], _Reporter], dict[str, Any]]


def _job_grid(project: Project, params: dict[str, Any], report: _Reporter) -> dict[str, Any]:
    from al_core.wsi.grid import GridSpec

    grid_id = project.build_grid(GridSpec.from_dict(params))
    return {"grid_id": grid_id, "patches": len(project.patches())}


def _job_train(project: Project, params: dict[str, Any], report: _Reporter) -> dict[str, Any]:
    """Train (fresh or from a model), then predict every patch with the new model so the queue re-ranks."""
    from al_core.learn.predict import predict
    from al_core.learn.train import Progress, TrainOptions, train

    options = TrainOptions(**params.get("options", {}))

    def on_progress(p: Progress) -> None:
        report({"stage": "train", "event": p.event, "epoch": p.epoch, "step": p.step,
                "steps_per_epoch": p.steps_per_epoch, "loss": p.loss, "metrics": p.metrics,
                "epochs": options.epochs, "message": p.message}, force=p.event in ("epoch", "end"))

    result = train(project, options, from_model=params.get("from_model"), encoder=params.get("encoder"),
                   progress=on_progress, cancel=report.cancelled, on_model=_link_model(project, report.job_id))
    out: dict[str, Any] = {"train": result.to_dict(), "model_id": result.model_id, "status": result.status}
    if result.status == "done" and params.get("predict", True):
        report({"stage": "predict"}, force=True)
        out["predict"] = predict(project, result.model_id).to_dict()
    return out


def _job_predict(project: Project, params: dict[str, Any], report: _Reporter) -> dict[str, Any]:
    from al_core.learn.predict import predict

    report({"stage": "predict"}, force=True)
    model_id = project.models.resolve(params.get("model", "active")).id
    _link_model(project, report.job_id)(model_id)
    return predict(project, model_id).to_dict()


JOB_KINDS: dict[str, JobFn] = {"grid": _job_grid, "train": _job_train, "predict": _job_predict}
