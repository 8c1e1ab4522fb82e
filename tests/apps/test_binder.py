"""Binder, without Binder: what repo2docker does with ``binder/`` (a fresh environment from
``binder/requirements.txt``, then ``binder/postBuild``), then a session the way Binder starts one (``binder/start``
wrapping the Jupyter server, under a ``/binder/jupyter/user/<id>/`` base URL), opened in headless Chromium at the
README's ``urlpath``. PyTorch's CPU index cannot be reached from here, so its lines give way to this machine's
local torch pin; everything else is installed for real into a new virtual environment (a few minutes)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from _browser import CHROMIUM, CHROMIUM_ARGS, free_port, http_status, outside_requests, wait_until_up

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
BASE = "/binder/jupyter/user/slideloop-x1y2/"
TIMEOUT = 120_000  # ms: a cold kernel on two shared cores


@dataclass
class Session:
    url: str
    token: str
    home: Path


def local_requirements(text: str) -> str:
    """``binder/requirements.txt`` as this machine can install it: no PyTorch index (unreachable here), and the
    torch/torchvision pins without their ``+cpu`` tag (the local wheels carry their own)."""
    lines = [line for line in text.splitlines() if "download.pytorch.org" not in line]
    return "\n".join(re.sub(r"^(torch|torchvision)==([\w.]+)\+cpu$", r"\1==\2", line) for line in lines) + "\n"


def _checkout(dest: Path) -> None:
    """The repository as Binder clones it: tracked files and new files git does not ignore."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, names):
        src = ROOT / name
        if src.is_file():  # a tracked file deleted in the working tree is not in a clone of it either
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Session]:
    work = tmp_path_factory.mktemp("binder")
    home = work / "repo"
    _checkout(home)
    requirements = (home / "binder" / "requirements.txt").read_text()
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in requirements
    assert re.search(r"^torch==[\d.]+\+cpu$", requirements, re.M), "Binder must get a CPU build of torch"
    (work / "requirements.txt").write_text(local_requirements(requirements))

    venv = work / "venv"
    subprocess.run([sys._base_executable, "-m", "venv", str(venv)], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLIDELOOP_", "JUPYTER", "VIRTUAL_ENV"))}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}/usr/local/bin{os.pathsep}/usr/bin{os.pathsep}/bin",
               VIRTUAL_ENV=str(venv), PYTHONWARNINGS="ignore")
    # repo2docker: `pip install -r binder/requirements.txt` in the repository, then postBuild there
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "-r", str(work / "requirements.txt")],
                         cwd=home, env=env, capture_output=True, text=True, timeout=1500)
    assert pip.returncode == 0, pip.stderr[-4000:]
    env["HOME"] = str(home)  # Binder's home is the repository; no ~/.jupyter of this machine's user
    post = subprocess.run([str(home / "binder" / "postBuild")], cwd=home, env=env, capture_output=True, text=True,
                          timeout=600)
    assert post.returncode == 0, post.stdout + post.stderr
    assert (home / "demo-project" / "project.db").is_file()

    port, token = free_port(), "binder-" + os.urandom(8).hex()
    env.update(JUPYTER_TOKEN=token, REPO_DIR=str(home))
    # as Binder runs it: the start script wrapping a plain Jupyter server; the extensions come from their
    # config.d files in the new environment, nothing names them on the command line
    cmd = [str(home / "binder" / "start"), "jupyter", "server", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
           f"--ServerApp.base_url={BASE}", "--ServerApp.open_browser=False",
           *(["--ServerApp.allow_root=True"] if os.geteuid() == 0 else [])]
    log = work / "server.log"
    with open(log, "wb") as fh:
        # its own process group: the start script leaves the Dask scheduler and worker running beside the server
        proc = subprocess.Popen(cmd, cwd=home, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}{BASE}"
    try:
        wait_until_up(proc, lambda: http_status(f"{url}api/status?token={token}"), log, "the Binder server", 90)
        yield Session(url, token, home)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_readme_binder_link_opens_the_app(session: Session) -> None:
    readme = (ROOT / "README.md").read_text()
    m = re.search(r"https://mybinder\.org/v2/gh/[\w.-]+/[\w.-]+/HEAD\?urlpath=(voila/render/[\w/.-]+\.ipynb)", readme)
    assert m, "README has no Binder link opening the app"
    urlpath = m.group(1)
    assert (session.home / urlpath.removeprefix("voila/render/")).is_file()

    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 900})
            requests: list[str] = []
            tiles: list = []
            page.on("request", lambda r: requests.append(r.url))
            page.on("response", lambda r: tiles.append(r) if "/slideloop/tiles/" in r.url else None)
            page.goto(f"{session.url}{urlpath}?token={session.token}")
            page.wait_for_selector(".slideloop-view-link", timeout=TIMEOUT)
            summary = page.inner_text(".slideloop-summary")
            assert "demo-project" in summary and "1 slide," in summary  # postBuild's project, found by start

            page.locator(".slideloop-view-link", has_text="Review").click()
            page.wait_for_selector(".slideloop-map img.leaflet-tile-loaded[src*='/slideloop/tiles/']", timeout=TIMEOUT)
            assert page.url.startswith(f"{session.url}voila/render/apps/review.ipynb")
            assert tiles and all(r.url.startswith(f"{session.url}slideloop/tiles/") for r in tiles)
            assert all(r.status == 200 and r.headers["content-type"].startswith("image/") for r in tiles)
            assert "Train" in page.inner_text(".slideloop-tabs")
            assert outside_requests(requests) == []
        finally:
            browser.close()

    # the start script's job cluster: one worker with the GPU slot, for every kernel of the session
    from distributed import Client

    with Client(scheduler_file=str(session.home / ".slideloop-dask" / "scheduler.json"), timeout=30,
                set_as_default=False) as client:
        workers = list(client.scheduler_info()["workers"].values())
    assert len(workers) == 1 and workers[0]["resources"] == {"GPU": 1}
