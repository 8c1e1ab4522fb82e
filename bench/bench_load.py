"""Load test on the hub configuration (``deploy/jupyterhub_config.py``), loopback only, bounded in users, tiles
and time: N simulated users log in with headless Chromium (one browser context each, one thread each), open the
review view, pan (each loads ``--tiles`` slide tiles as images from inside its page, as that user), save a
correction (a new label version in their project, written through the core as the Save button does), then
close the page. Reports first-tile seconds, tile p50/p99 across users, the RSS of each user's server and kernel
with the page open and idle, and the kernels left running once every page is closed (should be none).

    python bench/bench_load.py [--users 4] [--tiles 60] [--timeout 600]

Needs npm's configurable-http-proxy and Debian's chromium (as tests/apps/test_hub.py); skips when absent.
Nothing is asserted: it is a measurement to read. Not covered here: users starting training jobs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "apps"))
sys.path.insert(0, str(ROOT / "bench"))

from _browser import CHROMIUM, CHROMIUM_ARGS, free_port, http_status, wait_until_up  # noqa: E402
from _sample_project import SAMPLE_GEOJSON, SAMPLE_SVS  # noqa: E402
from _util import print_table  # noqa: E402

from al_core.project.project import Project  # noqa: E402
from al_core.wsi.grid import GridSpec  # noqa: E402

PASSWORD = "load-" + os.urandom(6).hex()
# tiles are loaded as the map loads them, as images: JupyterHub's single-user servers take the login cookie from
# an <img> request, while a cookie-authenticated fetch() also needs an XSRF token; ?pan= defeats the browser cache
TILE_JS = """async (urls) => { const out = [];
  for (const u of urls) { const t = performance.now();
    const ok = await new Promise(res => { const im = new Image(); im.onload = () => res(200);
      im.onerror = () => res(0); im.src = u + '?pan=' + Math.random(); });
    out.push([ok, performance.now() - t, u]); }
  return out; }"""


def start_hub(work: Path, users: list[str]) -> tuple[subprocess.Popen[bytes], str, dict[str, Path]]:
    """The example hub config with a shared-password authenticator and local-process spawner, on loopback."""
    root = work / "projects"
    projects = {}
    for name in users:
        with Project.create(root / name) as proj:
            proj.add_slide(SAMPLE_SVS)
            proj.build_grid(GridSpec(patch=256))
            proj.import_labels(SAMPLE_GEOJSON, author="preannotation")
        projects[name] = (root / name).resolve()
    port, hub_port, api_port, sched_port = free_port(), free_port(), free_port(), 20000 + os.getpid() % 10000
    (work / "hub_config.py").write_text(
        f"load_subconfig({str(ROOT / 'deploy' / 'jupyterhub_config.py')!r})\nc = get_config()\n"
        "c.JupyterHub.authenticator_class = 'shared-password'\n"
        f"c.SharedPasswordAuthenticator.user_password = {PASSWORD!r}\n"
        "c.JupyterHub.spawner_class = 'simple'\n"
        f"c.SimpleLocalProcessSpawner.home_dir_template = {str(work / 'home' / '{username}')!r}\n"
        f"c.JupyterHub.hub_bind_url = 'http://127.0.0.1:{hub_port}'\n"
        f"c.ConfigurableHTTPProxy.api_url = 'http://127.0.0.1:{api_port}'\n"
        f"c.ConfigurableHTTPProxy.pid_file = {str(work / 'proxy.pid')!r}\n"
        f"c.JupyterHub.db_url = 'sqlite:///{work / 'hub.sqlite'}'\n"
        f"c.JupyterHub.cookie_secret_file = {str(work / 'cookie_secret')!r}\n"
        "c.Spawner.start_timeout = 300\nc.Spawner.http_timeout = 300\n")
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, SLIDELOOP_HUB_URL=url, SLIDELOOP_PROJECTS_ROOT=str(root.resolve()),
               SLIDELOOP_SCHEDULER_PORT=str(sched_port), PYTHONWARNINGS="ignore")
    env.pop("SLIDELOOP_SCHEDULER", None)
    env.pop("SLIDELOOP_PROJECT", None)
    log = work / "hub.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "jupyterhub", "-f", str(work / "hub_config.py")],
                                cwd=work, env=env, stdout=fh, stderr=subprocess.STDOUT)
    wait_until_up(proc, lambda: http_status(f"{url}/hub/api/"), log, "jupyterhub", 120)
    return proc, url, projects


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


def one_user(hub: str, name: str, project: Path, tiles: int, idle: threading.Barrier, done: threading.Barrier,
             out: dict[str, Any]) -> None:
    """Log in, open the review view, pan, save a correction, wait for the RSS reading, close the page; a failure
    is recorded in ``out`` and releases the other users (the barriers break) instead of hanging the run."""
    try:
        _user_steps(hub, name, project, tiles, idle, done, out)
    except Exception as err:  # any failure: reported in the table, the run goes on
        out["error"] = f"{type(err).__name__}: {str(err)[:200]}"
        idle.abort()
        done.abort()


def _user_steps(hub: str, name: str, project: Path, tiles: int, idle: threading.Barrier, done: threading.Barrier,
                out: dict[str, Any]) -> None:
    from playwright.sync_api import sync_playwright
    from shapely.geometry import box

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_context().new_page()
            page.goto(f"{hub}/hub/login")
            page.fill("input[name=username]", name)
            page.fill("input[name=password]", PASSWORD)
            page.click("[type=submit]")
            page.wait_for_url(f"**/user/{name}/**", timeout=300_000)
            page.wait_for_selector(".slideloop-view-link", timeout=300_000)  # the landing page, as a user sees it
            t0 = time.perf_counter()
            page.goto(f"{hub}/user/{name}/voila/render/review.ipynb")
            page.wait_for_selector(".slideloop-map img.leaflet-tile-loaded[src*='/slideloop/tiles/']", timeout=300_000)
            out["first_tile_s"] = time.perf_counter() - t0
            urls = [f"/user/{name}/slideloop/tiles/1/{z}/{x}/{y}.jpeg"
                    for z, x, y in [(4, x, y) for x in range(9) for y in range(12)]][:tiles]
            res = page.evaluate(TILE_JS, urls)
            out["tile_ms"] = [ms for status, ms, _ in res if status == 200]
            out["tile_errors"] = [f"{status} {what}" for status, _, what in res if status != 200]
            with Project.open(project) as proj:  # the Save button's write: a new label version
                out["saved_version"] = proj.correct(1, box(100, 100, 164, 164), class_idx=1, author=name)
            idle.wait(timeout=600)  # every user's page is open: the RSS is read now
            done.wait(timeout=600)
            page.close(run_before_unload=True)
            time.sleep(3)
        finally:
            browser.close()


def main() -> int:
    """Run the load test and print its tables."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=4)
    ap.add_argument("--tiles", type=int, default=60, help="tiles each user fetches while panning")
    ap.add_argument("--timeout", type=float, default=900, help="seconds before the whole run is abandoned")
    args = ap.parse_args()
    if not shutil.which("configurable-http-proxy") or not Path(CHROMIUM).exists():
        print("skipped: needs configurable-http-proxy and chromium")
        return 0
    names = [f"user{i}" for i in range(args.users)]
    tmp = tempfile.mkdtemp(prefix="slideloop-load-")  # kept: hub.log holds every user's server log
    print(f"work folder: {tmp}")
    proc, hub, projects = start_hub(Path(tmp), names)
    try:
        idle, done = threading.Barrier(len(names) + 1), threading.Barrier(len(names) + 1)
        outs: dict[str, dict[str, Any]] = {n: {} for n in names}
        threads = [threading.Thread(target=one_user, args=(hub, n, projects[n], args.tiles, idle, done, outs[n]),
                                    daemon=True) for n in names]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        try:
            idle.wait(timeout=args.timeout)
            time.sleep(5)  # let the kernels settle after their first render
        except threading.BrokenBarrierError:
            pass  # a user failed: its error is in the table
        rss = user_rss()
        try:
            done.wait(timeout=60)
        except threading.BrokenBarrierError:
            pass
        for t in threads:
            t.join(timeout=max(1.0, args.timeout - (time.perf_counter() - t0)))
        time.sleep(5)
        after = user_rss()
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    ms = sorted(m for o in outs.values() for m in o.get("tile_ms", []))
    rows = [{"user": n, "first_tile_s": round(o.get("first_tile_s", float("nan")), 2),
             "tiles": len(o.get("tile_ms", [])), "tile_errors": len(o.get("tile_errors", [])),
             "error": o.get("error", ""),
             "saved_version": o.get("saved_version", "-"),
             "server_mb": round(rss.get(n, {}).get("server_mb", 0.0)),
             "kernel_mb": round(rss.get(n, {}).get("kernel_mb", 0.0)),
             "kernels_open": rss.get(n, {}).get("kernels", 0), "kernels_after_close": after.get(n, {}).get("kernels", 0)}
            for n, o in outs.items()]
    for n, o in outs.items():
        for e in o.get("tile_errors", [])[:3]:
            print(f"{n}: tile error {e}")
    print_table(rows, f"{args.users} users on the hub config (page open and idle; kernels after the pages closed)")
    if ms:
        print_table([{"tiles": len(ms), "p50_ms": round(statistics.median(ms), 1),
                      "p99_ms": round(ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))], 1),
                      "idle_mb_per_user": round(statistics.fmean(r["server_mb"] + r["kernel_mb"] for r in rows))}],
                    "tiles fetched from the users' pages while all were open")
    return 0


if __name__ == "__main__":
    sys.exit(main())
