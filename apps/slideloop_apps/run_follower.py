"""Finished training runs reach the review queue whether or not anyone opened the Train tab.

A run may be started from this page, another page, another user of a shared project or the CLI. A daemon
thread looks at the store once a second; when the project's current run has finished since the last look, its
model goes to :meth:`AppState.use_model` (which re-ranks the queue and swaps the prediction overlay) and the
review message says so. On a shared scheduler it also connects once a run is active (queue positions) and ends
runs the scheduler lost. The Train tab's panel shows the runs; this class does what must happen without it.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from al_core.project import jobs
from al_core.project.schema import ModelRow
from slideloop_apps.model_choice import evaluation_of
from slideloop_apps.state import AppState
from slideloop_apps.training import RunView, TrainingService

log = logging.getLogger(__name__)

#: seconds between two looks at the store
POLL_S = 1.0
#: a queued/running job the shared scheduler has not heard of for this long was lost (scheduler restart)
LOST_GRACE_S = 30.0
#: seconds between two checks for lost jobs on a shared scheduler
REAP_EVERY_S = 10.0


class RunFollower:
    """Hands each finished run's model to the queue once, from a poll thread or from the panel's refresh."""

    def __init__(self, state: AppState, service: TrainingService | None = None) -> None:
        self.state = state
        self.service = service or TrainingService(state.project, author=state.author)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        current = self.service.current_job()
        # the state already ranks with the newest finished model when the page opens
        self._applied: int | None = current.id if current is not None and current.status == "done" else None

    def start(self) -> RunFollower:
        """Start the poll thread (once); returns self."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._poll, name="slideloop-run-follower", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the poll thread."""
        self._stop.set()

    def apply(self, view: RunView | None) -> bool:
        """If ``view`` is a finished run not handed over yet, give its model to the queue and say so; True then."""
        if view is None or view.status != "done" or view.model_id is None:
            return False
        with self._lock:
            if self._applied == view.job_id:
                return False
            self._applied = view.job_id
        self.state.use_model()  # the active model: the new one only if it was promoted
        row = self.state.project.models.get(view.model_id)
        self.state.say(finished_message(view, row), "ok" if self.state.model_id == view.model_id else "warning")
        return True

    def check(self) -> None:
        """One look at the store: connect/reap on a shared scheduler, apply a newly finished run."""
        shared = bool(os.environ.get(jobs.SCHEDULER_ENV))
        # a shared scheduler is cheap to reach: connect at once for queue positions and lost jobs;
        # a per-kernel LocalCluster starts only when this kernel submits
        if shared and not self.service.connected and self.service.active_job() is not None:
            self.service.client  # noqa: B018 (connects)
        job = self.service.current_job()
        if job is not None and job.status == "done" and job.id != self._applied:
            self.apply(self.service.view(job, with_position=False))

    def _poll(self) -> None:
        reaped = 0.0
        while not self._stop.wait(POLL_S):
            try:
                if os.environ.get(jobs.SCHEDULER_ENV) and self.service.connected and \
                        time.monotonic() - reaped > REAP_EVERY_S:
                    reaped = time.monotonic()
                    self.service.reap_lost(LOST_GRACE_S)
                self.check()
            except Exception as err:  # the thread must outlive a bad poll (e.g. a locked database)
                log.exception("run follower poll failed")
                self.state.say(f"Could not read the training state: {type(err).__name__}: {err}", "error")


def finished_message(v: RunView, row: ModelRow | None) -> str:
    """What a finished run did to the queue: its model ranks it, or it was kept back (and why)."""
    ev = evaluation_of(row) if row is not None else {}
    if ev and not ev.get("promoted"):
        return (f"Job {v.job_id} finished: model {v.model_id} was kept back ({ev.get('reason')}); "
                f"model {ev.get('active_id')} still ranks the queue.")
    return f"Job {v.job_id} finished: model {v.model_id} ranks the queue now."
