"""Helpers for tests and benchmarks that drive the real app: a ``jupyter server`` subprocess started the way
``slideloop app`` starts it, and headless Debian Chromium through Playwright (never ``playwright install``)."""

from __future__ import annotations

import io
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from al_core.cli.app_cmds import server_command

CHROMIUM = os.environ.get("SLIDELOOP_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class AppServer:
    """A running app server: its root URL (with base_url), token and log file."""

    url: str
    token: str
    proc: subprocess.Popen[bytes]
    log: Path
    base_url: str = "/"
    extra: dict[str, Any] = field(default_factory=dict)

    def get(self, path: str, token: bool = True) -> tuple[int, bytes, dict[str, str]]:
        """GET ``path`` (relative to base_url) without following redirects."""
        req = urllib.request.Request(self.url + path.lstrip("/"))
        if token:
            req.add_header("Authorization", f"token {self.token}")
        opener = urllib.request.build_opener(_NoRedirect)
        try:
            with opener.open(req, timeout=60) as resp:
                return resp.status, resp.read(), dict(resp.headers)
        except urllib.error.HTTPError as err:
            return err.code, err.read(), dict(err.headers)

    def app_url(self) -> str:
        return f"{self.url}voila/render/review.ipynb?token={self.token}"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def app_tracebacks(self) -> list[str]:
        """Tracebacks in the server log that pass through slideloop's code (``al_core``, ``slideloop_apps``).

        Use it instead of ``"Traceback" not in log_text()`` where a page reload races Jupyter's own kernel
        websocket handling: the reloaded page's old socket can log jupyter_server's
        ``'NoneType' object has no attribute 'kernel_ws_protocol'`` (jupyter-server/jupyter_server#1265),
        which is not the app's; nor is tornado's ``WebSocketClosedError`` when a closed page's socket is still
        being written to (pages now shut their kernel down as they close)."""
        blocks, current = [], None
        for line in self.log_text().splitlines():
            if line.strip().startswith("Traceback (most recent call last)"):
                current = [line]
                blocks.append(current)
            elif current is not None and line.startswith("["):  # the next log record
                current = None
            elif current is not None:
                current.append(line)
        texts = ["\n".join(b) for b in blocks]
        return [t for t in texts if "al_core" in t or "slideloop_apps" in t]


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def http_status(url: str) -> int:
    """The HTTP status of a GET (error statuses too, not raised)."""
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as err:
        return int(err.code)


def wait_until_up(proc: subprocess.Popen[bytes], probe: Callable[[], int], log: Path, what: str,
                  timeout: float) -> None:
    """Poll ``probe`` until it answers 200; fail with the process log if it exits or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited ({proc.returncode}):\n{log.read_text(errors='replace')}")
        try:
            if probe() == 200:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start in {timeout} s:\n{log.read_text(errors='replace')}")
        time.sleep(0.3)


@contextmanager
def app_server(project: Path, workdir: Path, base_url: str = "/", timeout: float = 90,
               extra_args: tuple[str, ...] = (), cull: tuple[int, int] | None = None,
               warm: int | None = None) -> Iterator[AppServer]:
    """Start ``jupyter server`` with Voilà and the tile server on a free port, as ``slideloop app`` does
    (``cull``: the idle-kernel culler's timeout and interval in seconds instead of the app's; ``warm``: warm
    kernels instead of the app's)."""
    port = free_port()
    token = "test-token-" + os.urandom(8).hex()
    runtime = workdir / "jupyter-runtime"
    runtime.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, JUPYTER_TOKEN=token, SLIDELOOP_PROJECT=str(project), JUPYTER_RUNTIME_DIR=str(runtime),
               PYTHONWARNINGS="ignore")
    options: dict[str, Any] = {"cull": cull} if cull else {}
    if warm is not None:
        options["warm"] = warm
    cmd = server_command(project, port, "127.0.0.1", open_browser=False, **options)
    if base_url != "/":
        cmd.append(f"--ServerApp.base_url={base_url}")
    cmd.extend(extra_args)
    log = workdir / f"server-{port}.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    server = AppServer(f"http://127.0.0.1:{port}{base_url}", token, proc, log, base_url)
    try:
        wait_until_up(proc, lambda: server.get("api/status")[0], log, "the server", timeout)
        yield server
    finally:
        proc.terminate()
        try:  # a clean stop may wait for a warming kernel (kernels.SHUTDOWN_WAIT_S) before shutting kernels down
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def browser_page(viewport: tuple[int, int] = (1440, 900)) -> Iterator[tuple[Any, list[str]]]:
    """A fresh headless Chromium page and the list of every URL it requests."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
            requests: list[str] = []
            page.on("request", lambda r: requests.append(r.url))
            yield page, requests
        finally:
            browser.close()


def page_kernel(page: Any) -> str:
    """Id of the kernel a Voilà page talks to (from the page's own ``api/kernels/<id>`` requests)."""
    ids = page.evaluate("() => [...new Set(performance.getEntriesByType('resource').map(e => e.name)"
                        ".map(n => (n.match(/\\/api\\/kernels\\/([0-9a-f-]{36})/) || [])[1]).filter(Boolean))]")
    assert len(ids) == 1, f"the page talks to one kernel, not {ids}"
    return str(ids[0])


def warm_kernels(srv: AppServer) -> list[str]:
    """Ids the server's log reports as warm kernels ready for a page (slideloop_apps.kernels), oldest first."""
    return re.findall(r"slideloop: warm kernel ([0-9a-f-]{36}) ready", srv.log_text())


def outside_requests(requests: list[str]) -> list[str]:
    """Requests that went anywhere but this machine (data: and blob: URLs stay in the page)."""
    out = []
    for url in requests:
        parts = urlsplit(url)
        if parts.scheme in ("data", "blob", "about"):
            continue
        if parts.hostname not in ("127.0.0.1", "localhost", "::1"):
            out.append(url)
    return out


def save_screenshot(page: Any, tmp_path: Path, name: str) -> Path:
    """Screenshot into the test's tmp dir and a copy in ``artifacts/`` for people to look at."""
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path))
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(path, ARTIFACTS / path.name)
    return path


def image_stats(png: bytes) -> tuple[float, float]:
    """Mean and standard deviation of an image's grey values (a blank tile has std ~0)."""
    from PIL import Image

    arr = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float32)
    return float(arr.mean()), float(arr.std())
