"""``slideloop app``: the Jupyter server command it runs (Voilà and the tile server, the view it opens), and its
refusal of a folder that is not a project, and that the URL it prints answers at once (the one test here that
starts a server)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from _browser import free_port
from conftest import run_cli

from al_core.cli.app_cmds import app_notebook_dir, server_command


def test_app_command_refuses_a_non_project(tmp_path: Path) -> None:
    proc = run_cli("app", str(tmp_path / "nowhere"), "--no-browser", check=False)
    assert proc.returncode == 2 and "not a slideloop project" in proc.stderr


@pytest.mark.parametrize("view, notebook", [(None, "index.ipynb"), ("review", "review.ipynb"),
                                            ("deploy", "deploy.ipynb")])
def test_server_command_runs_voila_and_the_tile_server(tmp_path: Path, view: str | None, notebook: str) -> None:
    kw = {} if view is None else {"view": view}
    cmd = server_command(tmp_path, 9999, "localhost", open_browser=False, **kw)
    line = " ".join(cmd)
    assert f"--ServerApp.default_url=/voila/render/{notebook}" in cmd  # the landing page by default
    assert "voila.server_extension=True" in line and "slideloop_apps=True" in line
    assert f"--SlideloopTiles.project={tmp_path}" in cmd
    assert "--ServerApp.open_browser=False" in cmd
    assert "token" not in line  # the token travels in the environment, never on the command line
    assert (app_notebook_dir() / notebook).is_file()


@pytest.mark.slow
def test_printed_url_answers_at_once(tmp_path: Path) -> None:
    """``slideloop demo`` prints its URL only once the server accepts connections: the URL works right away."""
    port = free_port()
    script = Path(sys.executable).with_name("slideloop")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "al_core.cli"]
    log = tmp_path / "server.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen([*cmd, "demo", "--dir", str(tmp_path / "demo"), "--no-browser", "--port", str(port)],
                                stdout=subprocess.PIPE, stderr=err, text=True,
                                env=dict(os.environ, PYTHONWARNINGS="ignore", JUPYTER_RUNTIME_DIR=str(tmp_path)))
    try:
        assert proc.stdout is not None
        url = next((line.strip() for line in proc.stdout if line.strip().startswith("http://")), None)
        assert url is not None, log.read_text()
        assert url.startswith(f"http://localhost:{port}/voila/render/index.ipynb?token=")
        with urllib.request.urlopen(url, timeout=120) as resp:  # no retry: refused here is the bug
            assert resp.status == 200
            assert b"application/vnd.jupyter.widget-view+json" in resp.read()  # the page, its widgets rendered
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C: the server and the job queue stop
        try:
            assert proc.wait(timeout=60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
