"""The app's own Dask cluster for training jobs: one scheduler and one worker as subprocesses.

``slideloop app`` starts it (unless ``SLIDELOOP_SCHEDULER`` already names a shared scheduler, e.g. a hub
service) and passes its scheduler file to the server's environment, so every kernel of the app (each browser
tab, each restart) queues on the same worker instead of starting a LocalCluster of its own, and a job outlives
the kernel that submitted it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from al_core._constants import RESOURCE
from al_core.errors import ProjectError


@contextlib.contextmanager
def job_cluster(folder: Path | None = None, timeout: float = 60) -> Iterator[str]:
    """Run a Dask scheduler and one worker (resource ``GPU=1``: one job at a time, in order) while the block
    runs; yields the scheduler file, a value for ``SLIDELOOP_SCHEDULER``. Logs go to ``dask.log`` beside it."""
    with contextlib.ExitStack() as stack:
        if folder is None:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="slideloop-dask-")))
        folder.mkdir(parents=True, exist_ok=True)
        sched_file = folder / "scheduler.json"
        sched_file.unlink(missing_ok=True)
        env = dict(os.environ, PYTHONWARNINGS="ignore")
        log = stack.enter_context(open(folder / "dask.log", "ab"))
        procs: list[subprocess.Popen[bytes]] = []
        if threading.current_thread() is threading.main_thread():
            # `kill PID` (SIGTERM) must stop the scheduler and worker too, not orphan them: raise as Ctrl-C does
            previous = signal.signal(signal.SIGTERM, _interrupt)
            stack.callback(signal.signal, signal.SIGTERM, previous)
        try:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "distributed.cli.dask_scheduler", "--scheduler-file", str(sched_file),
                 "--host", "127.0.0.1", "--port", "0", "--no-dashboard"], env=env, stdout=log, stderr=log))
            deadline = time.monotonic() + timeout
            while not (sched_file.exists() and sched_file.stat().st_size > 0):
                if procs[0].poll() is not None or time.monotonic() > deadline:
                    raise ProjectError(f"the Dask scheduler did not start (log: {folder / 'dask.log'})")
                time.sleep(0.2)
            address = json.loads(sched_file.read_text())["address"]
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1", "--nworkers", "1",
                 "--resources", f"{RESOURCE}=1", "--no-dashboard"], env=env, stdout=log, stderr=log))
            yield str(sched_file)
        finally:
            for p in reversed(procs):
                if p.poll() is None:
                    p.send_signal(signal.SIGINT)  # the worker leaves the scheduler cleanly
            for p in reversed(procs):
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
