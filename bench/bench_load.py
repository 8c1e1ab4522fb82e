"""Load test on the hub configuration (``deploy/jupyterhub_config.py``), loopback only, bounded in users, tiles
and time: N simulated users log in with headless Chromium (one browser context each, one thread each), open the
review view, pan (each loads ``--tiles`` slide tiles as images from inside its page, as that user), save a
correction (a new label version in their project, written through the core as the Save button does); then
``--trainers`` of them start a training job from the Train tab (tiny encoder, 1 epoch: the hub's one Dask
worker runs the jobs one at a time) while every user keeps panning until the jobs are over; then all close
their pages. Reports first-tile seconds, tile p50/p99 across users with the pages idle and while a job ran,
the RSS of each user's server and kernel with the page open and idle, the jobs' submit / start / finish order
(first come first served: started and finished in the order submitted, never overlapping), and the kernels
left running once every page is closed (should be none).

    python bench/bench_load.py [--users 8] [--trainers 2] [--tiles 60] [--timeout 900]

Needs npm's configurable-http-proxy and Debian's chromium (as tests/apps/test_hub.py); skips when absent.
Nothing is asserted: it is a measurement to read.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "apps"))
sys.path.insert(0, str(ROOT / "bench"))

from _browser import CHROMIUM, CHROMIUM_ARGS  # noqa: E402
from _hub import run_hub  # noqa: E402
from _sample_project import SAMPLE_GEOJSON, SAMPLE_SVS  # noqa: E402
from _util import print_table  # noqa: E402
from sqlalchemy import select  # noqa: E402

from al_core.project.project import Project  # noqa: E402
from al_core.project.schema import JobRow  # noqa: E402
from al_core.wsi.grid import GridSpec  # noqa: E402

TINY = "tu-mobilenetv3_small_050"
#: seconds between two users' logins: annotators arrive over a minute, not in the same instant
STAGGER_S = 3.0
PASSWORD = "load-" + os.urandom(6).hex()
# tiles are loaded as the map loads them, as images: JupyterHub's single-user servers take the login cookie from
# an <img> request, while a cookie-authenticated fetch() also needs an XSRF token; ?pan= defeats the browser cache
TILE_JS = """async (urls) => { const out = [];
  for (const u of urls) { const t = performance.now(), at = Date.now() / 1000;
    const ok = await new Promise(res => { const im = new Image(); im.onload = () => res(200);
      im.onerror = () => res(0); im.src = u + '?pan=' + Math.random(); });
    out.push([ok, performance.now() - t, u, at]); }
  return out; }"""


def make_projects(root: Path, users: list[str]) -> dict[str, Path]:
    """One project per user on the sample slide, as an admin makes them before the first login."""
    projects = {}
    for name in users:
        with Project.create(root / name) as proj:
            proj.add_slide(SAMPLE_SVS)
            proj.build_grid(GridSpec(patch=256))
            proj.import_labels(SAMPLE_GEOJSON, author="preannotation")
        projects[name] = (root / name).resolve()
    return projects


def train_jobs(project: Path) -> list[JobRow]:
    with Project.open(project) as proj, proj.store.read() as s:
        return list(s.scalars(select(JobRow).where(JobRow.kind == "train")))


def user_rss() -> dict[str, dict[str, float]]:
    """MB of resident memory per hub user: their single-user server and its kernels (by JUPYTERHUB_USER)."""
    import psutil

    out: dict[str, dict[str, float]] = {}
    for p in psutil.process_iter(["cmdline", "memory_info"]):
        try:
            user = p.environ().get("JUPYTERHUB_USER")
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        if not user or not p.info["cmdline"]:
            continue
        kind = "kernel_mb" if any("ipykernel" in a for a in p.info["cmdline"]) else "server_mb"
        row = out.setdefault(user, {"server_mb": 0.0, "kernel_mb": 0.0, "kernels": 0})
        row[kind] += p.info["memory_info"].rss / 2**20
        row["kernels"] += kind == "kernel_mb"
    return out


@dataclass
class Phases:
    """What the users and the main thread wait on: pages idle (RSS read), training go, training over, close."""

    idle: threading.Barrier
    train: threading.Barrier
    over: threading.Event
    done: threading.Barrier

    aborted: threading.Event

    def abort(self) -> None:
        self.aborted.set()
        for b in (self.idle, self.train, self.done):
            b.abort()
        self.over.set()


def one_user(hub: str, name: str, project: Path, tiles: int, trains: bool, phases: Phases,
             out: dict[str, Any]) -> None:
    """Log in, open the review view, pan, save a correction, wait for the RSS reading, start training (a
    trainer) and pan until the jobs are over, close the page; a failure is recorded in ``out`` and releases
    the other users (the barriers break) instead of hanging the run."""
    try:
        _user_steps(hub, name, project, tiles, trains, phases, out)
    except Exception as err:  # any failure: reported in the table, the run goes on
        out["error"] = f"{type(err).__name__}: {str(err)[:200]}"
        print(f"{name}: {out['error']}", flush=True)
        phases.abort()


def _set(page: Any, cls: str, value: str) -> None:
    box = page.locator(f".{cls} input")
    box.fill(value)
    box.press("Enter")  # ipywidgets' number boxes sync on Enter or blur


def _pan(page: Any, urls: list[str]) -> list[list[Any]]:
    res: list[list[Any]] = page.evaluate(TILE_JS, urls)
    return res


def _user_steps(hub: str, name: str, project: Path, tiles: int, trains: bool, phases: Phases,
                out: dict[str, Any]) -> None:
    from playwright.sync_api import sync_playwright
    from shapely.geometry import box

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_context(viewport={"width": 1440, "height": 900}).new_page()
            page.set_default_timeout(300_000)
            page.goto(f"{hub}/hub/login")
            page.fill("input[name=username]", name)
            page.fill("input[name=password]", PASSWORD)
            page.click("[type=submit]")
            page.wait_for_url(f"**/user/{name}/**", timeout=300_000)
            page.wait_for_selector(".slideloop-view-link", timeout=300_000)  # the landing page, as a user sees it
            t0 = time.perf_counter()
            # Voilà answers once the notebook has run: under this load that is past Playwright's 30 s default
            page.goto(f"{hub}/user/{name}/voila/render/review.ipynb", timeout=300_000)
            page.wait_for_selector(".slideloop-map img.leaflet-tile-loaded[src*='/slideloop/tiles/']", timeout=300_000)
            out["first_tile_s"] = time.perf_counter() - t0
            # z 4 is the sample's full resolution (9 x 12 tiles); the panning during training reads the rest of
            # it, then z 3, so the tile server's cache does not answer it all
            grid = [(4, x, y) for x in range(9) for y in range(12)] + [(3, x, y) for x in range(5) for y in range(6)]
            urls = [f"/user/{name}/slideloop/tiles/1/{z}/{x}/{y}.jpeg" for z, x, y in grid]
            res = _pan(page, urls[:tiles])
            out["tiles"] = res
            with Project.open(project) as proj:  # the Save button's write: a new label version
                out["saved_version"] = proj.correct(1, box(100, 100, 164, 164), class_idx=1, author=name)
            phases.idle.wait(timeout=600)  # every user's page is open: the RSS is read now
            phases.train.wait(timeout=600)
            if trains:  # as in tests/apps/test_hub.py: the Train tab, the tiny encoder, one epoch
                page.locator(".lm-TabBar-tab", has_text="Train").click()
                page.wait_for_selector(".slideloop-train-status", state="visible", timeout=120_000)
                page.locator(".slideloop-encoder select").select_option(TINY)
                _set(page, "slideloop-epochs", "1")
                _set(page, "slideloop-batch", "4")
                page.click("button.slideloop-train")
                out["clicked_train"] = time.time()
                page.locator(".lm-TabBar-tab", has_text="Review").click()  # back to the map to pan
            during: list[list[Any]] = []
            rest, i = urls[tiles:] or urls, 0
            while not phases.over.is_set():  # pan in small bursts until every job is over
                during += _pan(page, [rest[(i + k) % len(rest)] for k in range(10)])
                i += 10
                phases.over.wait(0.5)
            out["tiles_during"] = during
            if trains:
                page.locator(".lm-TabBar-tab", has_text="Train").click()
                out["train_status"] = page.inner_text(".slideloop-train-status")[:120]
            phases.done.wait(timeout=600)
            page.close(run_before_unload=True)
            time.sleep(3)
        finally:
            browser.close()


def pct(ms: list[float], q: float) -> float:
    return round(ms[min(len(ms) - 1, round(q * (len(ms) - 1)))], 1) if ms else float("nan")


def tile_row(what: str, ms: list[float], errors: int) -> dict[str, Any]:
    ms = sorted(ms)
    return {"tiles": what, "count": len(ms), "errors": errors, "p50_ms": pct(ms, 0.5), "p99_ms": pct(ms, 0.99),
            "max_ms": round(ms[-1], 1) if ms else float("nan")}


def wait_for_jobs(projects: list[Path], timeout: float, aborted: threading.Event) -> list[tuple[str, JobRow]]:
    """Poll the trainers' projects until each has a finished (or failed) training job, ``timeout`` passes or a
    user failed (``aborted``)."""
    deadline = time.monotonic() + timeout
    while True:
        rows = [(p.name, j) for p in projects for j in train_jobs(p)]
        if (len(rows) >= len(projects) and all(j.status not in ("queued", "running") for _, j in rows)) \
                or time.monotonic() > deadline or aborted.is_set():
            return rows
        time.sleep(1)


def job_table(rows: list[tuple[str, JobRow]]) -> tuple[list[dict[str, Any]], str]:
    """The jobs in submit order with start/finish relative to the first submit, and the FCFS verdict."""
    rows = sorted(rows, key=lambda r: r[1].submitted)
    t0 = rows[0][1].submitted if rows else 0.0

    def rel(v: float | None) -> float:
        return round(v - t0, 1) if v is not None else float("nan")

    table = [{"user": u, "job": j.id, "status": j.status, "submitted_s": rel(j.submitted),
              "started_s": rel(j.started), "finished_s": rel(j.finished),
              "run_s": round(j.finished - j.started, 1) if j.started and j.finished else float("nan")}
             for u, j in rows]
    jobs = [j for _, j in rows]
    if not jobs or any(j.started is None or j.finished is None for j in jobs):
        return table, "not all jobs ran to the end"
    by_start = sorted(jobs, key=lambda j: j.started or 0.0)
    by_finish = sorted(jobs, key=lambda j: j.finished or 0.0)
    no_overlap = all((a.finished or 0.0) <= (b.started or 0.0) for a, b in zip(by_start, by_start[1:], strict=False))
    fcfs = by_start == jobs and by_finish == jobs
    return table, (f"first come first served: {'yes' if fcfs else 'NO'} (start and finish order "
                   f"{'=' if fcfs else '!='} submit order); one at a time: {'yes' if no_overlap else 'NO'}")


def main() -> int:
    """Run the load test and print its tables."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=8)
    ap.add_argument("--trainers", type=int, default=2, help="users who start a training job (the first ones)")
    ap.add_argument("--tiles", type=int, default=60, help="tiles each user fetches while panning")
    ap.add_argument("--timeout", type=float, default=900, help="seconds before the whole run is abandoned")
    args = ap.parse_args()
    if not shutil.which("configurable-http-proxy") or not Path(CHROMIUM).exists():
        print("skipped: needs configurable-http-proxy and chromium")
        return 0
    names = [f"user{i}" for i in range(args.users)]
    trainers = names[: args.trainers]
    tmp = Path(tempfile.mkdtemp(prefix="slideloop-load-"))  # kept: hub.log holds every user's server log
    print(f"work folder: {tmp}")
    projects = make_projects(tmp / "projects", names)
    t_start = time.perf_counter()
    with run_hub(tmp, tmp / "projects", PASSWORD, spawn_timeout=300) as hub:
        n = len(names) + 1
        phases = Phases(threading.Barrier(n), threading.Barrier(n), threading.Event(), threading.Barrier(n),
                        threading.Event())
        outs: dict[str, dict[str, Any]] = {u: {} for u in names}
        threads = [threading.Thread(target=one_user, args=(hub.url, u, projects[u], args.tiles, u in trainers,
                                                           phases, outs[u]), daemon=True) for u in names]
        for t in threads:
            t.start()
            time.sleep(STAGGER_S)
        left = lambda: max(1.0, args.timeout - (time.perf_counter() - t_start))  # noqa: E731
        try:
            phases.idle.wait(timeout=left())
            time.sleep(5)  # let the kernels settle after their first render
        except threading.BrokenBarrierError:
            pass  # a user failed: its error is in the table
        rss = user_rss()
        try:
            phases.train.wait(timeout=60)
        except threading.BrokenBarrierError:
            pass
        jobs = wait_for_jobs([projects[u] for u in trainers], left(), phases.aborted) if trainers else []
        phases.over.set()
        try:
            phases.done.wait(timeout=120)
        except threading.BrokenBarrierError:
            pass
        for t in threads:
            t.join(timeout=left())
        time.sleep(5)
        after = user_rss()

    def ok(res: list[list[Any]]) -> list[list[Any]]:
        return [r for r in res if r[0] == 200]

    rows = [{"user": u, "trains": u in trainers, "first_tile_s": round(o.get("first_tile_s", float("nan")), 2),
             "tiles": len(ok(o.get("tiles", []))), "tiles_during": len(ok(o.get("tiles_during", []))),
             "error": o.get("error", ""), "saved_version": o.get("saved_version", "-"),
             "server_mb": round(rss.get(u, {}).get("server_mb", 0.0)),
             "kernel_mb": round(rss.get(u, {}).get("kernel_mb", 0.0)),
             "kernels_open": rss.get(u, {}).get("kernels", 0), "kernels_after_close": after.get(u, {}).get("kernels", 0)}
            for u, o in outs.items()]
    print_table(rows, f"{args.users} users on the hub config (page open and idle; kernels after the pages closed)")
    for u, o in outs.items():
        if "train_status" in o:
            print(f"{u}: Train tab says: {o['train_status']!r}")
    idle_res = [r for o in outs.values() for r in o.get("tiles", [])]
    during_res = [r for o in outs.values() for r in o.get("tiles_during", [])]
    # a tile counts as "while training" when it started inside a job's run (the jobs' own start/finish times)
    spans = [(j.started, j.finished) for _, j in jobs if j.started and j.finished]
    in_run = [r for r in during_res if any(a <= r[3] <= b for a, b in spans)]
    print_table([tile_row("pages open, no job", [r[1] for r in ok(idle_res)], len(idle_res) - len(ok(idle_res))),
                 tile_row("while a training job ran", [r[1] for r in ok(in_run)], len(in_run) - len(ok(in_run))),
                 tile_row("after Train clicked (all)", [r[1] for r in ok(during_res)],
                          len(during_res) - len(ok(during_res)))],
                "tiles fetched from the users' pages (cold server cache for the first pass)")
    if rows:
        print(f"idle RSS per user (server + kernel, pages open): "
              f"{round(statistics.fmean(r['server_mb'] + r['kernel_mb'] for r in rows))} MB")
    if jobs:
        table, verdict = job_table(jobs)
        print_table(table, "training jobs on the hub's one worker, in submit order (seconds from the first submit)")
        print(verdict)
    return 0


if __name__ == "__main__":
    sys.exit(main())
