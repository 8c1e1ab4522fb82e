"""Runs whose process died (``kill -9``, out of memory, a lost worker) end as failed, with the reason.

A training run and a job record the process running them (pid and host). Whoever looks next — any CLI
command, the job queue, the app's training panel — finds rows still ``training``/``running`` whose process is
gone on this host, marks them failed and removes what the dead run left: its temporary checkpoint and
temporary probability files (``.model.pt.*.tmp``, ``.probs.npy.*.tmp``). A process on another host cannot be
checked from here; the Dask queue notices those (:func:`al_core.project.jobs.mark_lost`).
"""

from __future__ import annotations

import os
import socket
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import select

from al_core.project.schema import JobRow, ModelRow

if TYPE_CHECKING:
    from al_core.project.project import Project

#: a process that started this much after the run was recorded is another one that reused the pid
PID_REUSE_SLACK_S = 2.0


def this_host() -> str:
    """The host name recorded with a run."""
    return socket.gethostname()


def this_process() -> tuple[int, str]:
    """(pid, host) of the calling process."""
    return os.getpid(), this_host()


def process_alive(pid: int, since: float | None) -> bool:
    """Whether ``pid`` on this host is alive and is the process that started no later than ``since``."""
    import psutil  # type: ignore[import-untyped,unused-ignore]

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return since is None or proc.create_time() <= since + PID_REUSE_SLACK_S
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def _dead(pid: int | None, host: str | None, since: float | None) -> bool:
    return pid is not None and host == this_host() and not process_alive(pid, since)


def _timestamp(iso: str | None) -> float | None:
    try:
        return datetime.fromisoformat(iso).timestamp() if iso else None
    except ValueError:
        return None


def reap(project: Project) -> list[str]:
    """Mark failed the project's runs whose process died on this host, remove their temporary files; returns
    one line per run ended."""
    reason = "the process running it (pid {pid} on {host}) died before it finished (killed, or out of memory)"
    ended: list[str] = []
    with project.store.read() as s:
        models = [(r.id, r.pid, r.host, _timestamp(r.created_at))
                  for r in s.scalars(select(ModelRow).where(ModelRow.status == "training")).all()]
        jobs = [(r.id, r.pid, r.host, r.started, r.model_id)
                for r in s.scalars(select(JobRow).where(JobRow.status == "running")).all()]
    dead_models = [(mid, pid, host) for mid, pid, host, since in models if _dead(pid, host, since)]
    dead_jobs = [(jid, pid, host, mid) for jid, pid, host, since, mid in jobs if _dead(pid, host, since)]
    if not dead_models and not dead_jobs:
        return ended
    now = time.time()
    with project.store.write() as s:
        for mid, pid, host in dead_models:
            row = s.get(ModelRow, mid)
            if row is not None and row.status == "training":
                row.status, row.error = "failed", reason.format(pid=pid, host=host)
                row.finished_at = datetime.fromtimestamp(now).astimezone().isoformat(timespec="seconds")
                ended.append(f"model {mid}: {row.error}")
        for jid, pid, host, _ in dead_jobs:
            job = s.get(JobRow, jid)
            if job is not None and job.status == "running":
                job.status, job.finished, job.error = "failed", now, reason.format(pid=pid, host=host)
                ended.append(f"job {jid}: {job.error}")
    for mid in {m for m, _, _ in dead_models} | {m for *_, m in dead_jobs if m is not None}:
        remove_temporaries(project, mid)
    return ended


def remove_temporaries(project: Project, model_id: int) -> list[Path]:
    """Delete the temporary files a dead run of ``model_id`` left (checkpoint and prediction writes)."""
    from al_core.learn.predictions import predictions_dir

    gone = []
    for folder in (project.models.folder(model_id), predictions_dir(project.root, model_id)):
        if folder.is_dir():
            for tmp in folder.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)
                gone.append(tmp)
    return gone
