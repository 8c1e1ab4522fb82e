"""``slideloop app``: the Jupyter server command it runs (Voilà and the tile server, the view it opens), and its
refusal of a folder that is not a project. No server is started here."""

from __future__ import annotations

from pathlib import Path

import pytest
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
