"""The shared job queue (al_core.project.jobs) on a real Dask scheduler and worker (subprocesses), fed by several
submitter processes; a train job links the model version it made. The queue's tests run on the project's SQLite
file and on PostgreSQL (``db_url``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

from al_core import Project
from al_core.project import jobs as jobs_mod
from al_core.project.project import DB_URL_ENV

pytestmark = pytest.mark.slow

SUBMITTER = textwrap.dedent("""
    import os, signal, sys, time
    from al_core import Project
    from al_core.project import jobs
    root, address, tag, n, die = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5] == "1"
    time.sleep(float(sys.argv[6]))
    client = jobs.connect(address)
    proj = Project.open(root)
    for i in range(n):
        jobs.submit(proj, "grid", {"patch": 256, "overlap": 64, "min_tissue": 0.25}, client=client, author=tag)
        time.sleep(0.3)
    if die:  # a kernel that dies right after submitting: no clean disconnect
        os.kill(os.getpid(), signal.SIGKILL)
    client.close()
""")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    sched_file = tmp_path_factory.mktemp("dask") / "scheduler.json"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    dask = [sys.executable, "-m", "distributed.cli.dask_scheduler"]
    sched = subprocess.Popen([*dask, "--scheduler-file", str(sched_file), "--port", "0", "--no-dashboard",
                              "--host", "127.0.0.1"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        if sched_file.exists() and sched_file.stat().st_size > 0:
            break
        time.sleep(0.2)
    address = json.loads(sched_file.read_text())["address"]
    worker = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1",
                               "--resources", f"{jobs_mod.RESOURCE}=1", "--no-dashboard", "--nworkers", "1"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    yield address
    for p in (worker, sched):
        p.send_signal(signal.SIGINT)
    for p in (worker, sched):
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()


def _blocker(client, name):
    """Another user's long job: holds the GPU slot until the test sets the Dask event ``name``."""
    from distributed import Event

    return client.submit(Event(name, client=client).wait, 120, resources={jobs_mod.RESOURCE: 1}, pure=False)


def _release(client, name):
    from distributed import Event

    Event(name, client=client).set()


def _wait(pred, timeout=120.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return True
        time.sleep(0.5)
    return False


def test_concurrent_submitters_run_one_at_a_time_in_order(tmp_path, cluster, sample_svs, db_url):
    root = tmp_path / "proj"
    with Project.create(root, db_url=db_url) as proj:
        proj.add_slide(sample_svs)
    client = jobs_mod.connect(cluster)
    # another user's long job holds the one GPU slot while the submitters queue up behind it
    hold = f"hold-1-{uuid.uuid4().hex}"  # one per run: a set event stays set for the module's cluster
    blocker = _blocker(client, hold)
    env = dict(os.environ, **({DB_URL_ENV: db_url} if db_url else {}))  # the submitters open the same database
    procs = [subprocess.Popen([sys.executable, "-c", SUBMITTER, str(root), cluster, f"user{i}", "2",
                               "1" if i == 1 else "0", str(0.8 * i)], env=env) for i in range(3)]
    for p in procs:
        p.wait(60)
    assert procs[1].returncode == -signal.SIGKILL
    with Project.open(root, db_url=db_url) as proj:
        queued = jobs_mod.jobs(proj, active_only=True)
        assert len(queued) == 6
        positions = [jobs_mod.status(proj, j.id, client).position for j in queued]
        assert sorted(p for p in positions if p is not None) == list(range(len(positions)))
        _release(client, hold)
        blocker.result()
        assert _wait(lambda: not jobs_mod.jobs(proj, active_only=True))
        done = jobs_mod.jobs(proj)
    assert [j.status for j in done] == ["done"] * 6, [j.error for j in done]
    # the killed submitter's jobs ran too (fire_and_forget), and nobody else's were lost
    assert sorted(j.author for j in done) == ["user0", "user0", "user1", "user1", "user2", "user2"]
    by_start = sorted(done, key=lambda j: j.started)
    assert [j.id for j in by_start] == sorted(j.id for j in done), "jobs ran in submission order"
    for a, b in zip(by_start, by_start[1:], strict=False):
        assert b.started >= a.finished, "two jobs ran at once on the one GPU slot"
    assert json.loads(done[-1].result)["patches"] > 0
    client.close()


def test_cancel_queued_job_never_runs(tmp_path, cluster, sample_svs, db_url):
    root = tmp_path / "proj"
    with Project.create(root, db_url=db_url) as proj:
        proj.add_slide(sample_svs)
        client = jobs_mod.connect(cluster)
        hold = f"hold-2-{uuid.uuid4().hex}"
        blocker = _blocker(client, hold)
        job = jobs_mod.submit(proj, "grid", {"patch": 256}, client=client)
        jobs_mod.cancel(proj, job)
        _release(client, hold)
        blocker.result()
        assert _wait(lambda: jobs_mod.status(proj, job).status not in jobs_mod.ACTIVE, 60)
        st = jobs_mod.status(proj, job)
        assert st.status == "cancelled" and st.started is None
        assert proj.grid_id() is None  # the cancelled grid job did nothing
        bad = jobs_mod.submit(proj, "grid", {"patch": 8}, client=client)
        assert _wait(lambda: jobs_mod.status(proj, bad).status == "failed", 60)
        assert "patch size must be at least 16" in (jobs_mod.status(proj, bad).error or "")
        client.close()


def test_unknown_kind_refused(tmp_path):
    with Project.create(tmp_path / "p") as proj, pytest.raises(ValueError, match="unknown job kind 'bake'"):
        jobs_mod.submit(proj, "bake", client=None)  # type: ignore[arg-type]


def test_lost_jobs_are_reported(tmp_path, cluster, db_url):
    with Project.create(tmp_path / "p", db_url=db_url) as proj:
        from al_core.project.schema import JobRow

        with proj.store.write() as s:
            s.add(JobRow(kind="train", dask_key="slideloop-job-train-gone", submitted=time.time(), status="running"))
        client = jobs_mod.connect(cluster)
        assert jobs_mod.mark_lost(proj, client) == [1]
        assert "lost" in (jobs_mod.status(proj, 1).error or "")
        client.close()



def test_lost_marking_spares_a_job_just_submitted(tmp_path, cluster, db_url):
    with Project.create(tmp_path / "p", db_url=db_url) as proj:
        from al_core.project.schema import JobRow

        with proj.store.write() as s:
            s.add(JobRow(kind="grid", dask_key="slideloop-job-grid-new", submitted=time.time(), status="queued"))
        client = jobs_mod.connect(cluster)
        assert jobs_mod.mark_lost(proj, client, grace_s=60.0) == []
        assert jobs_mod.status(proj, 1).status == "queued"
        assert jobs_mod.mark_lost(proj, client) == [1]
        client.close()


def test_train_job_links_the_model_it_made(tmp_path, cluster, sample_svs, sample_geojson):
    from al_core import GridSpec

    with Project.create(tmp_path / "p", ["Epithelium:#c80000"]) as proj:
        proj.add_slide(sample_svs)
        proj.build_grid(GridSpec(patch=128, overlap=0))
        proj.import_labels(sample_geojson)
        client = jobs_mod.connect(cluster)
        grid_job = jobs_mod.submit(proj, "grid", {"patch": 128, "overlap": 0}, client=client)
        train_job = jobs_mod.submit(proj, "train", {"options": {"epochs": 1, "max_steps": 1, "val_fraction": 0.1},
                                                    "encoder": "tu-mobilenetv3_small_050", "predict": False},
                                    client=client, author="dr-a")
        assert _wait(lambda: jobs_mod.status(proj, train_job).status not in jobs_mod.ACTIVE, 300)
        st = jobs_mod.status(proj, train_job)
        assert st.status == "done", st.error
        assert [j.id for j in jobs_mod.jobs(proj, kind="train")] == [train_job]
        assert [j.id for j in jobs_mod.jobs(proj, kind="grid")] == [grid_job]
        model_id = jobs_mod.job_model(proj, train_job)
        assert model_id == st.result["model_id"] == jobs_mod.job(proj, train_job).model_id
        assert proj.models.resolve("latest").id == model_id and jobs_mod.job_model(proj, grid_job) is None
        assert jobs_mod.job(proj, train_job).author == "dr-a" and st.progress["stage"] == "train"
        with pytest.raises(Exception, match="no job 99"):
            jobs_mod.job(proj, 99)
        client.close()
