"""Runs whose process dies end honestly: real subprocesses (a CLI training, a job as a Dask worker runs it, a
writer in the middle of a temporary file) killed with SIGKILL; the next command or the queue marks them
failed with the reason and removes their temporary files; the job row links the model it made."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from _engine import make_project
from conftest import run_cli

from al_core.learn.predictions import predictions_dir
from al_core.project import jobs as jobs_mod
from al_core.project.project import Project
from al_core.project.schema import JobRow, ModelRow

TINY_ARGS = ["--encoder", "tu-mobilenetv3_small_050", "--encoder-depth", "3", "--decoder-channels", "32", "16", "8"]
ENV = dict(os.environ, PYTHONWARNINGS="ignore")


def _wait(pred: Callable[[], object], timeout: float = 240.0) -> object:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = pred()
        if got:
            return got
        time.sleep(0.3)
    raise AssertionError("timed out")


def _model_row(root: Path, status: str) -> ModelRow | None:
    with Project.open(root) as proj:
        return next((m for m in proj.models.list() if m.status == status), None)


def _hold_temp(target: Path) -> subprocess.Popen[bytes]:
    """A process half-way through an atomic write of ``target`` (its temporary file exists), sleeping."""
    code = textwrap.dedent(f"""
        import time
        from al_core._io import atomic_path
        with atomic_path({str(target)!r}) as tmp:
            tmp.write_bytes(b"half")
            print("ready", flush=True)
            time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=ENV)
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
    return proc


@pytest.mark.slow
def test_killed_training_is_marked_failed_and_its_temporaries_removed(tmp_path, sample_svs, sample_geojson):
    root = tmp_path / "proj"
    make_project(root, sample_svs, sample_geojson).close()
    script = Path(sys.executable).with_name("slideloop")
    train = subprocess.Popen([str(script), "train", str(root), *TINY_ARGS, "--epochs", "200"], env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        row = _wait(lambda: _model_row(root, "training"))
        assert isinstance(row, ModelRow) and row.pid == train.pid
        writers = [_hold_temp(root / "models" / str(row.id) / "model.pt"),
                   _hold_temp(predictions_dir(root, row.id) / "probs.npy")]
    finally:
        train.send_signal(signal.SIGKILL)
        train.wait()
    for w in writers:
        w.send_signal(signal.SIGKILL)
        w.wait()
    temps = list((root / "models" / str(row.id)).glob(".model.pt.*.tmp"))
    temps += list(predictions_dir(root, row.id).glob(".probs.npy.*.tmp"))
    assert len(temps) == 2  # what a dead run leaves behind
    status = run_cli("status", str(root))  # the next command notices
    assert f"model {row.id}: the process running it (pid {train.pid}" in status.stderr
    assert "died before it finished" in status.stderr
    with Project.open(root) as proj:
        dead = proj.models.get(row.id)
        assert dead.status == "failed" and "died before it finished" in dead.error and dead.finished_at
    assert not any(t.exists() for t in temps)
    assert "note:" not in run_cli("status", str(root)).stderr  # said once


@pytest.mark.slow
def test_killed_job_worker_is_failed_by_the_queue_and_links_its_model(tmp_path, sample_svs, sample_geojson):
    root = tmp_path / "proj"
    with make_project(root, sample_svs, sample_geojson) as proj:
        with proj.store.write() as s:
            row = JobRow(kind="train", params=json.dumps({"options": {"epochs": 200}, "encoder":
                                                         "tu-mobilenetv3_small_050"}),
                         status="queued", dask_key="slideloop-job-test", submitted=time.time())
            s.add(row)
            s.flush()
            job_id = row.id
        url = proj.store.url
    code = f"from al_core.project.jobs import run_job; run_job({str(root)!r}, {url!r}, {job_id})"
    worker = subprocess.Popen([sys.executable, "-c", code], env=ENV, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        _wait(lambda: jobs_mod.job(Project.open(root), job_id).model_id is not None)
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    with Project.open(root) as proj:
        job = next(j for j in jobs_mod.jobs(proj) if j.id == job_id)  # the queue's listing notices
        assert job.status == "failed" and f"pid {worker.pid}" in job.error and job.finished
        model = proj.models.get(job.model_id)
        assert model is not None and model.status == "failed" and model.pid == worker.pid
