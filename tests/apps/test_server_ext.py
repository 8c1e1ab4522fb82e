"""The tile server extension (``slideloop_apps.server``) inside an in-process Jupyter server (pytest-jupyter's
``jp_fetch``): Jupyter's authentication, ids instead of paths, 404s for anything unregistered, the base_url
prefix, content types and cache headers, and the inference run downloads.

pytest-jupyter's fixtures are imported into this module only (not registered as a plugin for the whole suite):
its autouse fixtures give every test an event loop of its own and a ServerApp cleanup, which only these tests
need. They are synchronous and run ``jp_fetch``'s coroutine on that loop.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _browser import image_stats
from _deploy_project import TISSUE_RGB, finished_run, push_tissue_finder
from PIL import Image
from pytest_jupyter.jupyter_server import *  # noqa: F403  (the jp_* fixtures, for this module only)
from slideloop_apps import BASE_URL_ENV, DATA_DIR, PROJECT_ENV
from slideloop_apps.server import SETTINGS_KEY, SlideTileHandler
from tornado.httpclient import HTTPResponse
from tornado.httputil import HTTPHeaders, HTTPServerRequest, RequestStartLine
from traitlets.config import Config

from al_core.cli.app_cmds import build_demo
from al_core.project.project import Project

Fetch = Callable[..., HTTPResponse]

#: one route of each handler, all of the served project's first slide / run
ROUTES = ["slideloop/slides", "slideloop/tiles/1/2/1/1.jpeg", "slideloop/labels/1/2/1/1.png",
          "slideloop/prediction/1/1/2/1/1.png", "slideloop/inference/{run}/2/1/1.png",
          "slideloop/inference/{run}/files/tiff", "slideloop/inference/{run}/files/geojson"]
HUGE = "9" * 30  # an integer, but far beyond SQLite's 64 bits


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, sample_pyramid: Path) -> tuple[Path, str]:
    """The demo project (sample slide 1, its pre-annotation), a second slide whose file was deleted after it was
    registered, and one finished run of a pushed model; (project folder, run id)."""
    work = tmp_path_factory.mktemp("ext")
    root = build_demo(work / "demo").resolve()
    gone = shutil.copy(sample_pyramid, work / "moved-away.tif")
    with Project.open(root) as proj:
        proj.add_slide(gone)
    Path(gone).unlink()
    push_tissue_finder(root, work)
    return root, finished_run(root)


@pytest.fixture
def served(request: pytest.FixtureRequest, project: tuple[Path, str]) -> Path:
    """The project folder the server serves: :func:`project`'s unless a test parametrizes it indirectly with
    the name of another fixture."""
    name = getattr(request, "param", None)
    return project[0] if name is None else request.getfixturevalue(name)[0]


@pytest.fixture
def trained_copy(trained: tuple[Path, int], tmp_path: Path) -> tuple[Path, int]:
    """A copy of the session's trained project (conftest's ``trained``: tiny model, all patches predicted)."""
    root, model_id = trained
    shutil.copytree(root, tmp_path / "trained")
    return (tmp_path / "trained").resolve(), model_id


@pytest.fixture
def run_id(project: tuple[Path, str]) -> str:
    return project[1]


@pytest.fixture(scope="module", autouse=True)
def _fresh_event_loop_afterwards() -> Iterator[None]:
    """pytest-jupyter closes each test's event loop but leaves it set as the thread's loop: hand later tests (of
    other modules) a usable one."""
    yield
    asyncio.set_event_loop(asyncio.new_event_loop())


@pytest.fixture(autouse=True)
def _restore_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """The extension tells kernels the project and base URL through ``os.environ``: undo that after each test."""
    for var in (PROJECT_ENV, BASE_URL_ENV, "JUPYTER_PATH"):
        if var in os.environ:
            monkeypatch.setenv(var, os.environ[var])
        else:
            monkeypatch.delenv(var, raising=False)


@pytest.fixture
def jp_server_config(served: Path) -> Config:
    """pytest-jupyter's server with the slideloop extension enabled on the served project (and nothing else)."""
    return Config({"ServerApp": {"jpserver_extensions": {"slideloop_apps": True}},
                   "SlideloopTiles": {"project": str(served)}})


@pytest.fixture
def fetch(jp_fetch: Any, jp_serverapp: Any, jp_asyncio_loop: Any) -> Iterator[Fetch]:
    """GET through ``jp_fetch`` (under the server's base_url), no redirects followed, error statuses returned.
    ``token=False`` sends no credentials, a string sends that token instead of the server's."""

    def get(*parts: str, token: bool | str = True, headers: dict[str, str] | None = None) -> HTTPResponse:
        headers = dict(headers or {})
        if token is False:
            headers["Authorization"] = ""
        elif isinstance(token, str):
            headers["Authorization"] = f"token {token}"
        coro = jp_fetch(*parts, headers=headers, follow_redirects=False, raise_error=False)
        return jp_asyncio_loop.run_until_complete(coro)

    yield get
    jp_serverapp.web_app.settings[SETTINGS_KEY].close()


@pytest.fixture
def fetch_raw(fetch: Fetch, http_server_client: Any, jp_auth_header: dict[str, str], jp_base_url: str,
              jp_asyncio_loop: Any) -> Callable[[str], HTTPResponse]:
    """GET a path exactly as written, percent-escapes included (``jp_fetch`` would escape the '%' again);
    a path starting with '/' is absolute, others are under the base_url."""

    def get(path: str) -> HTTPResponse:
        url = path if path.startswith("/") else jp_base_url + path
        coro = http_server_client.fetch(url, headers=jp_auth_header, follow_redirects=False, raise_error=False)
        return jp_asyncio_loop.run_until_complete(coro)

    return get


def _no_content(resp: HTTPResponse, names: bool = False) -> None:
    """Not an image, a GeoJSON, a TIFF, the database, a system file or a server path; with ``names`` also no
    slide name (authenticated users see the names in the slide list, others see nothing)."""
    body = resp.body or b""
    assert not body.startswith((b"\xff\xd8", b"\x89PNG", b"II*", b"MM\x00*", b"SQLite"))
    assert b"Feature" not in body and b"root:" not in body and b"/tmp/" not in body and b"/work/" not in body
    assert not names or (b"CMU-1" not in body and b"moved-away" not in body)


# --- authentication ---------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ROUTES)
def test_refused_without_credentials(fetch: Fetch, run_id: str, route: str) -> None:
    resp = fetch(route.format(run=run_id), token=False)
    assert resp.code == 302 and "/login" in resp.headers["Location"]
    _no_content(resp, names=True)


@pytest.mark.parametrize("route", ROUTES)
def test_refused_with_a_wrong_token(fetch: Fetch, run_id: str, route: str) -> None:
    resp = fetch(route.format(run=run_id), token="not-the-token")
    assert resp.code == 302 and "/login" in resp.headers["Location"]
    _no_content(resp, names=True)


# --- what is served -------------------------------------------------------------------------------------


def test_slides_json_has_ids_not_paths(fetch: Fetch, served: Path) -> None:
    resp = fetch("slideloop/slides")
    assert resp.code == 200 and resp.headers["Content-Type"] == "application/json"
    assert resp.headers["Cache-Control"] == "no-cache"
    slides = json.loads(resp.body)
    assert [(s["id"], s["name"], s["file_present"]) for s in slides] == [
        (1, "CMU-1-Small-Region", True), (2, "moved-away", False)]
    assert slides[0]["zmax"] == 4 and (slides[0]["width"], slides[0]["height"]) == (2220, 2967)
    text = resp.body.decode()
    assert all("path" not in s for s in slides)
    assert str(served) not in text and "data/sample" not in text and ".tif" not in text


def test_slide_tile_is_an_immutable_private_jpeg(fetch: Fetch) -> None:
    resp = fetch("slideloop/tiles/1/2/1/1.jpeg")
    assert resp.code == 200 and resp.headers["Content-Type"] == "image/jpeg"
    assert resp.headers["Cache-Control"] == "private, max-age=31536000, immutable"
    assert Image.open(io.BytesIO(resp.body)).size == (256, 256)
    assert image_stats(resp.body)[1] > 10  # tissue, not a blank tile


def test_label_tile_revalidates(fetch: Fetch) -> None:
    resp = fetch("slideloop/labels/1/1/0/0.png")
    assert resp.code == 200 and resp.headers["Content-Type"] == "image/png"
    assert resp.headers["Cache-Control"] == "no-cache" and resp.headers.get("Etag")
    im = Image.open(io.BytesIO(resp.body))
    assert im.mode == "RGBA" and im.getextrema()[3] == (0, 255)  # transparent background, opaque labels
    again = fetch("slideloop/labels/1/1/0/0.png", headers={"If-None-Match": resp.headers["Etag"]})
    assert again.code == 304 and not again.body  # unchanged labels: the browser keeps its copy


def test_a_slide_whose_file_is_gone(fetch: Fetch, served: Path) -> None:
    """Its pixels are a 404 that names the slide id and never the path; its labels are still served."""
    resp = fetch("slideloop/tiles/2/0/0/0.jpeg")
    assert resp.code == 404 and resp.headers["Content-Type"].startswith("text/plain")
    assert b"slide 2: file missing or unreadable" in resp.body
    assert b"moved-away" not in resp.body and str(served).encode() not in resp.body
    assert fetch("slideloop/labels/2/0/0/0.png").code == 200


@pytest.mark.parametrize("served", ["trained_copy"], indirect=True)
def test_prediction_tile(fetch: Fetch, trained_copy: tuple[Path, int]) -> None:
    """A trained model's argmax over one tile (the engine tests' tiny model on the sample)."""
    _, model_id = trained_copy
    resp = fetch(f"slideloop/prediction/1/{model_id}/2/0/0.png")
    assert resp.code == 200 and resp.headers["Content-Type"] == "image/png"
    assert resp.headers["Cache-Control"] == "no-cache"
    im = Image.open(io.BytesIO(resp.body))
    assert im.mode == "RGBA" and im.size == (256, 256) and im.getextrema()[3][1] > 0  # predicted pixels show
    for other in (model_id + 1, HUGE):  # no such model
        resp = fetch(f"slideloop/prediction/1/{other}/2/0/0.png")
        assert resp.code == 404, resp.body[:200]


def test_inference_tile_and_downloads(fetch: Fetch, project: tuple[Path, str]) -> None:
    root, run_id = project
    resp = fetch(f"slideloop/inference/{run_id}/2/1/1.png")
    assert resp.code == 200 and resp.headers["Content-Type"] == "image/png"
    assert resp.headers["Cache-Control"] == "private, max-age=31536000, immutable"
    im = Image.open(io.BytesIO(resp.body))
    assert im.mode == "RGBA" and im.size == (256, 256) and im.getextrema()[3][1] == 255
    rgba = np.asarray(im)
    assert (rgba[rgba[..., 3] > 0][:, :3] == TISSUE_RGB).all(axis=1).any()  # the model's colour for its class

    run = root / "inference" / run_id
    for kind, ctype, name in (("tiff", "image/tiff", "CMU-1-Small-Region.tiff"),
                              ("geojson", "application/geo+json", "CMU-1-Small-Region.geojson"),
                              ("report", "application/json", "CMU-1-Small-Region.report.json")):
        resp = fetch(f"slideloop/inference/{run_id}/files/{kind}")
        assert resp.code == 200 and resp.headers["Content-Type"] == ctype, kind
        assert resp.headers["Content-Disposition"] == f'attachment; filename="{name}"'
        assert resp.headers["Cache-Control"] == "private, no-cache"
        assert resp.body == (run / name).read_bytes()  # the whole file, streamed in chunks
        assert int(resp.headers["Content-Length"]) == len(resp.body)
    assert json.loads((run / "CMU-1-Small-Region.geojson").read_text())["type"] == "FeatureCollection"
    report = (run / "CMU-1-Small-Region.report.json").read_text()
    assert "/" not in json.loads(report)["slide"] and str(root.resolve()) not in report  # no server folders


# --- 404 for anything not registered ------------------------------------------------------------------------


@pytest.mark.parametrize("path", [
    "slideloop/tiles/7/0/0/0.jpeg",                     # unknown slide id
    "slideloop/tiles/abc/0/0/0.jpeg",                   # not an id
    "slideloop/tiles/1.0/0/0/0.jpeg",
    "slideloop/tiles/1/9/0/0.jpeg",                     # above the top zoom
    "slideloop/tiles/1/-1/0/0.jpeg",
    "slideloop/tiles/1/0/5/0.jpeg",                     # outside the slide
    "slideloop/tiles/1/0/0/1.jpeg",
    "slideloop/labels/1/2/-1/0.png",
    "slideloop/labels/0/0/0/0.png",
    "slideloop/prediction/1/1/0/0/0.png",               # no model in the project
    f"slideloop/tiles/{HUGE}/0/0/0.jpeg",               # huge ids and indices
    f"slideloop/tiles/{1 << 63}/0/0/0.jpeg",            # the first id past SQLite's 64 bits
    f"slideloop/tiles/1/{HUGE}/0/0.jpeg",
    f"slideloop/tiles/1/4/{HUGE}/0.jpeg",
    f"slideloop/labels/{HUGE}/0/0/0.png",
    f"slideloop/labels/1/0/0/{HUGE}.png",
    f"slideloop/prediction/{HUGE}/1/0/0/0.png",
    f"slideloop/prediction/1/{HUGE}/0/0/0.png",
    "slideloop/tiles/1/0/0/0.png",                      # wrong extension
    "slideloop/files/project.db",                       # not a route
    "slideloop/project.db",
])
def test_not_found(fetch: Fetch, path: str) -> None:
    resp = fetch(path)
    assert resp.code == 404, resp.body[:200]
    _no_content(resp)


@pytest.mark.parametrize("path", [
    "slideloop/inference/20000101-000000-abcdef/0/0/0.png",   # unknown run id
    "slideloop/inference/20000101-000000-abcdef/files/tiff",
    "slideloop/inference/{run}/9/0/0.png",                     # above the top zoom
    "slideloop/inference/{run}/0/3/0.png",                     # outside the map
    "slideloop/inference/{run}/a/0/0.png",                     # not a tile index
    f"slideloop/inference/{{run}}/{HUGE}/0/0.png",
    f"slideloop/inference/{{run}}/0/{HUGE}/0.png",
    "slideloop/inference/{run}/files/probabilities",           # not a served kind
    "slideloop/inference/{run}/files/run.json",
    "slideloop/inference/{run}/files/CMU-1-Small-Region.tiff",  # file names are not kinds
    "slideloop/inference/in-progress/files/tiff",              # a folder without run.json
    "slideloop/inference/in-progress/0/0/0.png",
    "slideloop/inference/" + "x" * 65 + "/files/tiff",         # not a run id
])
def test_inference_not_found(fetch: Fetch, project: tuple[Path, str], path: str) -> None:
    root, run_id = project
    (root / "inference" / "in-progress").mkdir(exist_ok=True)
    (root / "inference" / "in-progress" / "x.tiff").write_bytes(b"II*\x00")
    resp = fetch(path.format(run=run_id))
    assert resp.code == 404, resp.body[:200]
    _no_content(resp)


@pytest.mark.parametrize("path", [
    "slideloop/tiles/..%2F..%2Fproject.db/0/0/0.jpeg",          # paths never work as ids
    "slideloop/tiles/1/0/0/..%2F..%2F..%2Fetc%2Fpasswd",
    "slideloop/tiles/%2Fetc%2Fpasswd/0/0/0.jpeg",
    "slideloop/labels/1%2F..%2F2/0/0/0.png",
    "slideloop/inference/..%2F..%2Fproject.db/files/tiff",
    "slideloop/inference/..%2Fdeployed%2Ftissue-finder/files/tiff",
    "slideloop/inference/%2Fetc%2Fpasswd/0/0/0.png",
    "slideloop/inference/{run}/files/..%2F..%2F..%2Fproject.db",
])
def test_escaped_paths_not_found(fetch_raw: Callable[[str], HTTPResponse], run_id: str, path: str) -> None:
    resp = fetch_raw(path.format(run=run_id))
    assert resp.code == 404, resp.body[:200]
    _no_content(resp)


def test_errors_are_plain_text(fetch: Fetch) -> None:
    """Tiles are fetched by <img> tags and scripts: a short text reason, not Jupyter's HTML error page."""
    resp = fetch("slideloop/tiles/1/9/0/0.jpeg")
    assert resp.code == 404 and resp.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert resp.body.decode().startswith("404: ") and "zoom 9" in resp.body.decode() and b"<html" not in resp.body


# --- the base URL --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("jp_base_url", ["/user/test/"])
def test_routes_live_under_the_base_url(fetch: Fetch, fetch_raw: Callable[[str], HTTPResponse],
                                        jp_base_url: str) -> None:
    resp = fetch("slideloop/tiles/1/0/0/0.jpeg")
    assert resp.code == 200 and image_stats(resp.body)[1] > 10
    assert fetch("slideloop/labels/1/0/0/0.png").code == 200
    assert fetch_raw("/user/test/slideloop/slides").code == 200
    for outside in ("/slideloop/tiles/1/0/0/0.jpeg", "/slideloop/slides", "/user/slideloop/slides"):
        assert fetch_raw(outside).code == 404, outside


def test_extension_tells_kernels_the_base_url(jp_serverapp: Any, fetch: Fetch, served: Path,
                                              jp_base_url: str) -> None:
    """Kernels inherit the server's environment: the loader puts the base URL and the project there, and the
    Voilà template's data directory on JUPYTER_PATH."""
    assert os.environ[BASE_URL_ENV] == jp_base_url
    assert os.environ[PROJECT_ENV] == str(served)
    assert str(DATA_DIR) in os.environ["JUPYTER_PATH"].split(os.pathsep)  # the offline Voilà template

    def handler_for(uri: str) -> type:
        req = HTTPServerRequest(start_line=RequestStartLine("GET", uri, "HTTP/1.1"),
                                headers=HTTPHeaders({"Host": "localhost"}))
        return jp_serverapp.web_app.find_handler(req).handler_class

    assert handler_for(f"{jp_base_url}slideloop/tiles/1/0/0/0.jpeg") is SlideTileHandler
    assert handler_for("/slideloop/tiles/1/0/0/0.jpeg") is not SlideTileHandler
    from slideloop_apps.state import server_base_url, tiles_root

    assert server_base_url() == jp_base_url and tiles_root() == f"{jp_base_url}slideloop/"


def test_the_server_draws_the_top_tiles_before_the_first_page(jp_serverapp: Any, fetch: Fetch) -> None:
    """Start-up warm-up: the project, the imports and slide 1 are opened on the pools before any request, so a
    first page's tiles do not wait for them. Slide 2's file is gone: its slide tile is skipped, not fatal."""
    service = jp_serverapp.web_app.settings[SETTINGS_KEY]
    assert [job.result(timeout=60) for job in service.warming] == [1, 2]
    cache = service.source().cache
    assert cache.get(("slide", 1, 0, 0, 0)) is not None and cache.get(("slide", 2, 0, 0, 0)) is None
    resp = fetch("slideloop", "tiles", "1", "0", "0", "0.jpeg")
    assert resp.code == 200 and resp.body == cache.get(("slide", 1, 0, 0, 0))
    assert fetch("slideloop", "tiles", "2", "0", "0", "0.jpeg").code == 404
