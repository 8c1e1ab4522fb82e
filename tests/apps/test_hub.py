"""The JupyterHub set-up of ``deploy/jupyterhub_config.py``, run for real on loopback: npm's
configurable-http-proxy, DummyAuthenticator with a password, SimpleLocalProcessSpawner, the shared Dask
scheduler and one worker as hub services. Two users log in with headless Chromium, each opens the app on their
own project, and each trains a tiny model from the Train tab on the hub's one worker."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from _browser import CHROMIUM, CHROMIUM_ARGS, free_port, http_status, wait_until_up
from sqlalchemy import select

from al_core.project.project import Project
from al_core.project.schema import JobRow
from al_core.wsi.grid import GridSpec

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "deploy" / "jupyterhub_config.py"
PASSWORD = "hub-test-" + os.urandom(6).hex()
USERS = ("alice", "bob")
TIMEOUT = 120_000  # ms: spawning a server and a cold kernel on two shared cores
TINY = "tu-mobilenetv3_small_050"


@dataclass
class Hub:
    url: str
    scheduler: str
    projects: dict[str, Path]
    log: Path


def _free_low_port() -> int:
    """A free port below Linux's ephemeral range. The worker service dials the scheduler's port until the
    scheduler listens; were that port ephemeral, one dial could bind it as its own source port (TCP
    self-connect) and the scheduler then fails with 'Address already in use' (seen here)."""
    for port in random.sample(range(20000, 32000), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-32000")


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory, sample_svs: Path, sample_geojson: Path) -> Iterator[Hub]:
    if not shutil.which("configurable-http-proxy"):
        pytest.fail("configurable-http-proxy is not installed (npm install -g configurable-http-proxy@5)")
    work = tmp_path_factory.mktemp("hub")
    root = work / "projects"
    projects = {}
    for name in USERS:  # what an admin does before the users' first login
        with Project.create(root / name) as proj:
            proj.add_slide(sample_svs)
            proj.build_grid(GridSpec(patch=256))
            proj.import_labels(sample_geojson, author="preannotation")
        projects[name] = (root / name).resolve()

    port, hub_port, api_port, sched_port = free_port(), free_port(), free_port(), _free_low_port()
    # the example as deployed, with the test's own authenticator, ports and state files on top
    (work / "jupyterhub_config.py").write_text(
        f"load_subconfig({str(EXAMPLE)!r})\n"
        "c = get_config()\n"
        # DummyAuthenticator's password option, renamed in JupyterHub 5.3
        "c.JupyterHub.authenticator_class = 'shared-password'\n"
        f"c.SharedPasswordAuthenticator.user_password = {PASSWORD!r}\n"
        "c.JupyterHub.spawner_class = 'simple'\n"
        f"c.SimpleLocalProcessSpawner.home_dir_template = {str(work / 'home' / '{username}')!r}\n"
        f"c.JupyterHub.hub_bind_url = 'http://127.0.0.1:{hub_port}'\n"
        f"c.ConfigurableHTTPProxy.api_url = 'http://127.0.0.1:{api_port}'\n"
        f"c.ConfigurableHTTPProxy.pid_file = {str(work / 'proxy.pid')!r}\n"
        f"c.JupyterHub.db_url = 'sqlite:///{work / 'hub.sqlite'}'\n"
        f"c.JupyterHub.cookie_secret_file = {str(work / 'cookie_secret')!r}\n"
        "c.Spawner.start_timeout = 120\n"
        "c.Spawner.http_timeout = 120\n"
    )
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, SLIDELOOP_HUB_URL=url, SLIDELOOP_PROJECTS_ROOT=str(root.resolve()),
               SLIDELOOP_SCHEDULER_PORT=str(sched_port), PYTHONWARNINGS="ignore")
    env.pop("SLIDELOOP_SCHEDULER", None)
    env.pop("SLIDELOOP_PROJECT", None)
    log = work / "hub.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "jupyterhub", "-f", str(work / "jupyterhub_config.py")],
                                cwd=work, env=env, stdout=fh, stderr=subprocess.STDOUT)
    try:
        wait_until_up(proc, lambda: http_status(f"{url}/hub/api/"), log, "jupyterhub", 60)
        yield Hub(url, f"tcp://127.0.0.1:{sched_port}", projects, log)
    finally:
        proc.terminate()  # the hub stops the proxy, the users' servers and its services
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _login(page: Any, hub: Hub, name: str) -> None:
    page.goto(f"{hub.url}/hub/login")
    page.fill("input[name=username]", name)
    page.fill("input[name=password]", PASSWORD)
    page.click("[type=submit]")
    page.wait_for_url(f"**/user/{name}/**", timeout=TIMEOUT)  # spawned, then sent to the user's server


def _set(page: Any, cls: str, value: str) -> None:
    box = page.locator(f".{cls} input")
    box.fill(value)
    box.press("Enter")  # ipywidgets' number boxes sync on Enter or blur


def _jobs(project: Path) -> list[JobRow]:
    with Project.open(project) as proj, proj.store.read() as s:
        return list(s.scalars(select(JobRow).where(JobRow.kind == "train")))


def test_two_users_on_one_hub(hub: Hub) -> None:
    from distributed import Client
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            pages: dict[str, Any] = {}
            tiles: dict[str, list[Any]] = {}
            for name in USERS:
                ctx = browser.new_context(viewport={"width": 1440, "height": 900})  # one cookie jar per user
                page = ctx.new_page()
                tiles[name] = []
                page.on("response", lambda r, n=name: tiles[n].append(r) if "/slideloop/tiles/" in r.url else None)
                _login(page, hub, name)
                # the hub sends a user to the landing page, whose links stay under the user's prefix
                page.wait_for_selector(".slideloop-view-link", timeout=TIMEOUT)
                assert page.url.startswith(f"{hub.url}/user/{name}/voila/render/index.ipynb")
                hrefs = page.eval_on_selector_all(".slideloop-view-link", "els => els.map(e => e.href)")
                assert hrefs == [f"{hub.url}/user/{name}/voila/render/{nb}" for nb in ("review.ipynb", "deploy.ipynb")]
                page.locator(".slideloop-view-link", has_text="Review").click()
                page.wait_for_url(f"{hub.url}/user/{name}/voila/render/review.ipynb", timeout=TIMEOUT)
                page.wait_for_selector(".slideloop-map img.leaflet-tile-loaded[src*='/slideloop/tiles/']",
                                       timeout=TIMEOUT)
                pages[name] = page

            # --- each user's tiles come from their own server, as images -----------------------------------
            for name in USERS:
                assert tiles[name], f"{name}: no tile requests"
                for resp in tiles[name]:
                    assert f"{hub.url}/user/{name}/slideloop/tiles/" in resp.url, resp.url
                    assert resp.status == 200, (resp.url, resp.status)
                    assert resp.headers["content-type"].startswith("image/")
                    assert len(resp.body()) > 500
            # --- alice, logged in, cannot read bob's tiles, slide list or notebooks ------------------------
            bob_tile = tiles["bob"][0].url
            alice = pages["alice"].request
            own = alice.get(tiles["alice"][0].url, max_redirects=0)
            assert own.status == 200 and own.headers["content-type"].startswith("image/")
            for path in (bob_tile, f"{hub.url}/user/bob/slideloop/slides",
                         f"{hub.url}/user/bob/api/contents/review.ipynb"):
                resp = alice.get(path)  # redirects followed: through the hub's OAuth, back to bob's server
                assert resp.status == 403, (path, resp.status, resp.url)
                assert not resp.headers.get("content-type", "").startswith("image/")
                assert b"CMU-1" not in resp.body() and b"nbformat" not in resp.body()  # no slide list, no notebook
            # and without any login a tile is a redirect to the hub, never an image
            anon = p.request.new_context()
            resp = anon.get(bob_tile, max_redirects=0)
            assert resp.status == 302 and "/hub/" in resp.headers["location"]
            anon.dispose()

            # --- both users train from the Train tab; both jobs go through the hub's one worker ------------
            for name in USERS:
                page = pages[name]
                page.locator(".lm-TabBar-tab", has_text="Train").click()
                page.wait_for_selector(".slideloop-train-status", state="visible", timeout=TIMEOUT)
                page.locator(".slideloop-encoder select").select_option(TINY)
                _set(page, "slideloop-epochs", "1")
                _set(page, "slideloop-batch", "2")
                _set(page, "slideloop-max-steps", "2")
                page.click("button.slideloop-train")
            for name in USERS:
                pages[name].wait_for_function(
                    "() => /finished|failed/.test(document.querySelector('.slideloop-train-status').innerText)",
                    timeout=240_000)
                assert "finished" in pages[name].inner_text(".slideloop-train-status")
        finally:
            browser.close()

    rows = {name: _jobs(hub.projects[name]) for name in USERS}
    for name in USERS:
        assert len(rows[name]) == 1, rows[name]
        job = rows[name][0]
        assert job.status == "done", (name, job.status, job.error)
        assert job.author == name  # the hub user submitted it
        assert json.loads(job.params)["options"]["max_steps"] == 2
    # one GPU slot: the two runs never overlapped, whichever came first
    a, b = sorted((rows[n][0] for n in USERS), key=lambda r: r.started)
    assert a.finished <= b.started
    # and both went through the hub's scheduler service, to its single worker
    with Client(hub.scheduler, timeout=30, set_as_default=False) as client:
        workers = client.scheduler_info()["workers"]
        assert len(workers) == 1
        seen = set(client.run_on_scheduler(lambda dask_scheduler: [str(t[0]) for t in dask_scheduler.transition_log]))
    assert {rows[n][0].dask_key for n in USERS} <= seen
