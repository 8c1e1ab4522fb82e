"""The JupyterHub set-up of ``deploy/jupyterhub_config.py``, run for real on loopback: npm's
configurable-http-proxy, DummyAuthenticator with a password, SimpleLocalProcessSpawner, the shared Dask
scheduler and one worker as hub services. Two users log in with headless Chromium, each opens the app on their
own project, and each trains a tiny model from the Train tab on the hub's one worker."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from _browser import CHROMIUM, CHROMIUM_ARGS
from _hub import run_hub
from sqlalchemy import select

from al_core.project.project import Project
from al_core.project.schema import JobRow
from al_core.wsi.grid import GridSpec

pytestmark = pytest.mark.slow
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
    with run_hub(work, root, PASSWORD, spawn_timeout=120, start_timeout=60) as running:
        yield Hub(running.url, running.scheduler, projects, running.log)


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
