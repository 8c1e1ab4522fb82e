"""The tile server extension behind a real ``jupyter server`` (started as ``slideloop app`` starts it):
Jupyter's authentication, ids instead of paths, 404s for anything unregistered, and a base_url prefix."""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import tornado.web
from _browser import AppServer, app_server, image_stats
from PIL import Image
from slideloop_apps import BASE_URL_ENV, PROJECT_ENV
from slideloop_apps.server import SETTINGS_KEY, SlideTileHandler, load_extension
from tornado.httputil import HTTPHeaders, HTTPServerRequest, RequestStartLine
from traitlets.config import Config, Configurable

from al_core.cli.app_cmds import build_demo

TILE_PATHS = ["slideloop/tiles/1/2/1/1.jpeg", "slideloop/labels/1/2/1/1.png", "slideloop/slides"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo(tmp_path_factory.mktemp("ext") / "demo").resolve()


@pytest.fixture(scope="module")
def server(demo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppServer]:
    with app_server(demo, tmp_path_factory.mktemp("srv")) as srv:
        yield srv


@pytest.mark.parametrize("path", TILE_PATHS)
def test_refused_without_credentials(server: AppServer, path: str) -> None:
    status, body, headers = server.get(path, token=False)
    assert status == 302 and "/login" in headers["Location"]
    assert not body.startswith(b"\xff\xd8") and b"PNG" not in body[:8]


def test_wrong_token_refused(server: AppServer) -> None:
    good, server.token = server.token, "not-the-token"
    try:
        assert server.get(TILE_PATHS[0])[0] == 302
    finally:
        server.token = good


def test_slide_tile(server: AppServer) -> None:
    status, body, headers = server.get("slideloop/tiles/1/2/1/1.jpeg")
    assert status == 200 and headers["Content-Type"] == "image/jpeg"
    assert "immutable" in headers["Cache-Control"]
    assert Image.open(io.BytesIO(body)).size == (256, 256)
    assert image_stats(body)[1] > 10  # tissue, not a blank tile


def test_label_tile_revalidates(server: AppServer) -> None:
    status, body, headers = server.get("slideloop/labels/1/1/0/0.png")
    assert status == 200 and headers["Content-Type"] == "image/png"
    assert headers["Cache-Control"] == "no-cache" and headers.get("Etag")
    im = Image.open(io.BytesIO(body))
    assert im.mode == "RGBA" and im.getextrema()[3] == (0, 255)  # transparent background, opaque labels


def test_slides_json_has_ids_not_paths(server: AppServer, demo: Path) -> None:
    status, body, _ = server.get("slideloop/slides")
    slides = json.loads(body)
    assert status == 200 and [s["id"] for s in slides] == [1]
    assert slides[0]["zmax"] == 4 and slides[0]["file_present"] is True
    assert "path" not in slides[0] and str(demo) not in body.decode() and "data/sample" not in body.decode()


@pytest.mark.parametrize("path", [
    "slideloop/tiles/7/0/0/0.jpeg",                 # unknown slide id
    "slideloop/tiles/abc/0/0/0.jpeg",               # not an id
    "slideloop/tiles/1/9/0/0.jpeg",                 # above the top zoom
    "slideloop/tiles/1/0/5/0.jpeg",                 # outside the slide
    "slideloop/labels/1/2/-1/0.png",
    "slideloop/prediction/1/1/0/0/0.png",           # no model side / no model
    "slideloop/tiles/..%2F..%2Fproject.db/0/0/0.jpeg",
    "slideloop/tiles/1/0/0/..%2F..%2F..%2Fetc%2Fpasswd",
    "slideloop/tiles/%2Fetc%2Fpasswd/0/0/0.jpeg",
    "slideloop/files/project.db",
])
def test_not_found(server: AppServer, path: str) -> None:
    status, body, _ = server.get(path)
    assert status == 404, body[:200]
    assert b"root:" not in body and b"SQLite" not in body


def test_base_url_prefix(demo: Path, tmp_path: Path) -> None:
    with app_server(demo, tmp_path, base_url="/user/test/") as srv:
        status, body, _ = srv.get("slideloop/tiles/1/0/0/0.jpeg")
        assert status == 200 and image_stats(body)[1] > 10
        assert srv.get("slideloop/labels/1/0/0/0.png")[0] == 200
        outside = AppServer(srv.url.replace("/user/test/", "/"), srv.token, srv.proc, srv.log)
        assert outside.get("slideloop/tiles/1/0/0/0.jpeg")[0] == 404


class _FakeServer(Configurable):
    """Just what the extension's loader touches of a ServerApp."""

    def __init__(self, base_url: str, config: Config) -> None:
        super().__init__(config=config)
        self.web_app = tornado.web.Application(base_url=base_url)
        self.log = logging.getLogger("fake-server")


def test_extension_tells_kernels_the_base_url(monkeypatch: pytest.MonkeyPatch, demo: Path) -> None:
    """Kernels inherit the server's environment: the loader puts the base URL and project there."""
    monkeypatch.delenv(BASE_URL_ENV, raising=False)
    monkeypatch.delenv(PROJECT_ENV, raising=False)
    monkeypatch.setenv("JUPYTER_PATH", "")
    cfg = Config({"SlideloopTiles": {"project": str(demo)}})
    fake = _FakeServer("/user/alice/", cfg)
    load_extension(fake)
    try:
        assert os.environ[BASE_URL_ENV] == "/user/alice/"
        assert os.environ[PROJECT_ENV] == str(demo)
        assert os.environ["JUPYTER_PATH"].endswith("_data")  # the offline Voilà template
        def handler_for(uri: str) -> type:
            req = HTTPServerRequest(start_line=RequestStartLine("GET", uri, "HTTP/1.1"),
                                    headers=HTTPHeaders({"Host": "localhost"}))
            return fake.web_app.find_handler(req).handler_class

        assert handler_for("/user/alice/slideloop/tiles/1/0/0/0.jpeg") is SlideTileHandler
        assert handler_for("/slideloop/tiles/1/0/0/0.jpeg") is not SlideTileHandler
        from slideloop_apps.state import server_base_url, tiles_root

        assert server_base_url() == "/user/alice/" and tiles_root() == "/user/alice/slideloop/"
    finally:
        fake.web_app.settings[SETTINGS_KEY].close()


def test_app_command_refuses_a_non_project(tmp_path: Path) -> None:
    from conftest import run_cli

    proc = run_cli("app", str(tmp_path / "nowhere"), "--no-browser", check=False)
    assert proc.returncode == 2 and "not a slideloop project" in proc.stderr


def test_server_command_runs_voila_and_the_tile_server(demo: Path) -> None:
    from al_core.cli.app_cmds import app_notebook_dir, server_command

    cmd = " ".join(server_command(demo, 9999, "localhost", open_browser=False))
    assert "--ServerApp.default_url=/voila/render/index.ipynb" in cmd  # the landing page by default
    assert "--ServerApp.default_url=/voila/render/review.ipynb" in " ".join(
        server_command(demo, 9999, "localhost", open_browser=False, view="review"))
    assert "voila.server_extension=True" in cmd and "slideloop_apps=True" in cmd
    assert f"--SlideloopTiles.project={demo}" in cmd and "token" not in cmd  # the token travels in the env
    assert all((app_notebook_dir() / nb).is_file() for nb in ("index.ipynb", "review.ipynb", "deploy.ipynb"))
