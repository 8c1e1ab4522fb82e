"""The tile server: authenticated Jupyter handlers over :class:`al_core.tiles.TileSource`.

Routes, all under ``<base_url>slideloop/`` and all behind Jupyter's own authentication::

    slides                                  JSON: registered slides (id, name, size, mpp, zmax, file present)
    tiles/<slide>/<z>/<x>/<y>.jpeg          slide tile, immutable
    labels/<slide>/<z>/<x>/<y>.png          current labels, RGBA, revalidated on every use
    prediction/<slide>/<model>/<z>/<x>/<y>.png   a model's argmax prediction, RGBA
    errors/<slide>/<model>/<z>/<x>/<y>.png       where that prediction and the current labels disagree, RGBA
    inference/<run>/<z>/<x>/<y>.png         class map of a deployment-view run (pyramidal TIFF), RGBA, immutable
    inference/<run>/files/<kind>            that run's output as a download: tiff, geojson or report

Only numeric slide ids and inference run ids appear in URLs; file paths come from the project database or the
run's own ``run.json`` (:mod:`al_core.project.runs`). Decoding runs on a
thread pool so a slow read never stalls the server's event loop (and with it every kernel websocket).
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from jupyter_server.base.handlers import JupyterHandler
from jupyter_server.utils import url_path_join
from tornado import web
from tornado.iostream import StreamClosedError
from traitlets import Int, Unicode
from traitlets.config import Configurable

from al_core.errors import ProjectError, SlideError, SlideloopError, TileRangeError
from al_core.project.project import Project
from al_core.project.runs import FILE_TYPES, check_run_id, load_run
from al_core.tiles.cache import LRUCache
from al_core.tiles.class_map import ClassMapTiles
from al_core.tiles.source import TileSource
from slideloop_apps import BASE_URL_ENV, DATA_DIR, PROJECT_ENV, ROUTE_PREFIX, kernels

SETTINGS_KEY = "slideloop_tiles"


class SlideloopTiles(Configurable):
    """Settings of the slideloop tile server (``c.SlideloopTiles.<name>`` or ``--SlideloopTiles.<name>=``)."""

    project = Unicode(
        "", config=True,
        help=f"project folder to serve; empty: the {PROJECT_ENV} environment variable",
    )
    workers = Int(4, config=True, help="threads decoding tiles (each keeps its own open slides)")
    cache_mb = Int(128, config=True, help="memory for hot tiles, MiB")


class TileService:
    """The project, its tile source and the decoding pool, built once per server."""

    def __init__(self, project_dir: str, workers: int, cache_mb: int) -> None:
        self.project_dir = project_dir
        self.cache_mb = cache_mb
        self.pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="slideloop-tiles")
        # overlays get their own threads: a slow prediction tile (or the first one, which imports the model
        # side) must not hold up the slide's own tiles
        self.overlay_pool = ThreadPoolExecutor(max_workers=max(1, workers // 2),
                                               thread_name_prefix="slideloop-overlays")
        self._source: TileSource | None = None
        self._lock = threading.Lock()
        self.warming: list[Future[int]] = []  # the start-up warm-up jobs (see load_extension)
        self._class_maps: dict[str, ClassMapTiles] = {}
        # class-map tiles of runs never change (a run id is never reused): a small cache of their own
        self._class_map_cache = LRUCache(max(1, cache_mb // 4) << 20)

    def source(self) -> TileSource:
        """The project's tile source, opened on first use (the project may be created after the server starts)."""
        with self._lock:
            if self._source is None:
                if not self.project_dir:
                    raise ProjectError(f"no slideloop project configured (set {PROJECT_ENV} or "
                                       "--SlideloopTiles.project)")
                self._source = TileSource(Project.open(self.project_dir), cache_bytes=self.cache_mb << 20)
            return self._source

    def warm(self, kind: str, slides: int = 4) -> int:
        """Draw the top tile (``kind``: "slide" or "labels") of the first ``slides`` registered slides into the
        cache, so a first page does not wait for the project to open, the imports and the slide files to open
        (about a second of a first paint); returns how many it drew. Anything missing (no project yet, a
        slide file gone) is left for the page to report."""
        drawn = 0
        try:
            src = self.source()
            for row in src.project.slides()[:slides]:
                draw = src.slide_tile if kind == "slide" else src.label_tile
                try:
                    draw(row.id, 0, 0, 0)
                    drawn += 1
                except SlideloopError:
                    continue
        except SlideloopError:
            pass
        return drawn

    async def run(self, fn: Any, *args: Any, overlay: bool = False) -> Any:
        """``fn(*args)``, run on the decoding pool (``overlay``: the overlays' pool) off the event loop."""
        pool = self.overlay_pool if overlay else self.pool
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    def slides_json(self) -> list[dict[str, Any]]:
        """The registered slides: id, name, level-0 size in pixels, µm/px, top zoom and whether the file is there."""
        src = self.source()
        out = []
        for row in src.project.slides():
            info = src.slide_info(row.id)
            out.append({"id": row.id, "name": row.name, "width": row.width, "height": row.height, "mpp": row.mpp,
                        "zmax": info.pyramid.zmax, "file_present": Path(row.path).is_file()})
        return out

    def _require_project(self) -> str:
        if not self.project_dir:
            raise ProjectError(f"no slideloop project configured (set {PROJECT_ENV} or --SlideloopTiles.project)")
        return self.project_dir

    def class_map(self, run_id: str) -> ClassMapTiles:
        """Tiles of a registered run's class map; ProjectError for an unknown or unfinished run."""
        check_run_id(run_id)
        with self._lock:
            tiles = self._class_maps.get(run_id)
        if tiles is None:
            path = load_run(self._require_project(), run_id).file("tiff")
            tiles = ClassMapTiles(path, cache=self._class_map_cache)
            with self._lock:
                if len(self._class_maps) >= 64:  # each keeps a tiffslide handle per thread: bound them
                    self._class_maps.pop(next(iter(self._class_maps)))
                self._class_maps[run_id] = tiles
        return tiles

    def inference_tile(self, run_id: str, z: int, x: int, y: int) -> bytes:
        """A tile of a registered run's class map (RGBA PNG)."""
        return self.class_map(run_id).tile(z, x, y)

    def inference_file(self, run_id: str, kind: str) -> Path:
        """Path of a registered run's output ``kind``; ProjectError for anything else."""
        return load_run(self._require_project(), check_run_id(run_id)).file(kind)

    def close(self) -> None:
        """Stop both pools (queued tiles are dropped) and close the project."""
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.overlay_pool.shutdown(wait=False, cancel_futures=True)
        if self._source is not None:
            self._source.project.close()


class _TileHandler(JupyterHandler):
    """Base: parses ids, runs the render on the pool, maps core errors to HTTP codes in one place."""

    content_type = "image/png"
    cache_control = "no-cache"
    overlay = True

    @property
    def service(self) -> TileService:
        service: TileService = self.settings[SETTINGS_KEY]
        return service

    async def _call(self, what: str, fn: Any, *args: Any) -> Any:
        """Run ``fn`` on the pool; the core's errors become HTTP errors here, for every route."""
        try:
            return await self.service.run(fn, *args, overlay=self.overlay)
        except (ProjectError, TileRangeError) as err:
            raise web.HTTPError(404, str(err)) from None
        except SlideError as err:
            # the registered file is gone or unreadable: say which one by id, never the server path
            raise web.HTTPError(404, f"{what}: file missing or unreadable ({err.problem})") from None

    async def _serve(self, fn: Any, *parts: str) -> None:
        ids = _ints(parts)
        data = await self._call(f"slide {ids[0]}" if ids else "slides", fn, *ids)
        self._send(data)

    def _send(self, data: bytes | str) -> None:
        self.set_header("Content-Type", self.content_type)
        self.set_header("Cache-Control", self.cache_control)
        self.finish(data)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        # plain text, not Jupyter's HTML error page: these are fetched by <img> tags and scripts
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        exc = kwargs.get("exc_info", (None, None, None))[1]
        reason = exc.log_message if isinstance(exc, web.HTTPError) and exc.log_message else self._reason
        self.finish(f"{status_code}: {reason}\n")


class SlideTileHandler(_TileHandler):
    """``tiles/<slide>/<z>/<x>/<y>.jpeg``: a slide tile, cached by the browser for a year."""

    content_type = "image/jpeg"
    overlay = False
    # a registered slide's pixels never change; the login cookie makes the response private
    cache_control = "private, max-age=31536000, immutable"

    @web.authenticated
    async def get(self, slide: str, z: str, x: str, y: str) -> None:
        """Send the slide tile."""
        await self._serve(lambda *a: self.service.source().slide_tile(*a), slide, z, x, y)


class LabelTileHandler(_TileHandler):
    """``labels/<slide>/<z>/<x>/<y>.png``: the slide's current labels, revalidated on every use."""

    @web.authenticated
    async def get(self, slide: str, z: str, x: str, y: str) -> None:
        """Send the label tile."""
        await self._serve(lambda *a: self.service.source().label_tile(*a), slide, z, x, y)


class PredictionTileHandler(_TileHandler):
    """``prediction/<slide>/<model>/<z>/<x>/<y>.png``: a model version's argmax prediction."""

    @web.authenticated
    async def get(self, slide: str, model: str, z: str, x: str, y: str) -> None:
        """Send the prediction tile."""
        await self._serve(lambda *a: self.service.source().prediction_tile(*a), slide, model, z, x, y)


class ErrorTileHandler(_TileHandler):
    """``errors/<slide>/<model>/<z>/<x>/<y>.png``: where a model's prediction and the current labels disagree."""

    @web.authenticated
    async def get(self, slide: str, model: str, z: str, x: str, y: str) -> None:
        """Send the error-map tile."""
        await self._serve(lambda *a: self.service.source().error_tile(*a), slide, model, z, x, y)


class InferenceTileHandler(_TileHandler):
    """``inference/<run>/<z>/<x>/<y>.png``: the class map of a deployment-view run."""

    # a run's class map never changes once registered
    cache_control = "private, max-age=31536000, immutable"

    @web.authenticated
    async def get(self, run: str, z: str, x: str, y: str) -> None:
        """Send the class-map tile."""
        self._send(await self._call(f"run {run}", self.service.inference_tile, run, *_ints((z, x, y))))


class InferenceFileHandler(_TileHandler):
    """A run's TIFF / GeoJSON / report as a download, streamed in chunks (class maps of big slides are large)."""

    chunk = 1 << 20

    @web.authenticated
    async def get(self, run: str, kind: str) -> None:
        """Send the run's ``kind`` output as an attachment; a cancelled download just stops."""
        path = await self._call(f"run {run}", self.service.inference_file, run, kind)
        self.set_header("Content-Type", FILE_TYPES[kind])
        self.set_header("Content-Disposition", f'attachment; filename="{path.name}"')
        self.set_header("Cache-Control", "private, no-cache")
        self.set_header("Content-Length", str(path.stat().st_size))
        with open(path, "rb") as fh:
            while True:
                data = await self.service.run(fh.read, self.chunk)
                if not data:
                    break
                self.write(data)
                try:
                    await self.flush()
                except StreamClosedError:
                    return  # the browser cancelled the download: nothing to report
        self.finish()


class SlidesHandler(_TileHandler):
    """``slides``: the registered slides as JSON."""

    content_type = "application/json"
    overlay = False

    @web.authenticated
    async def get(self) -> None:
        """Send the slide list."""
        self._send(json.dumps(await self._call("slides", self.service.slides_json)))


def _ints(parts: tuple[str, ...] | list[str]) -> list[int]:
    """URL path ids as integers; anything else is a 404 (never a 500)."""
    try:
        ids = [int(p) for p in parts]
    except ValueError:
        raise web.HTTPError(404, "ids and tile indices must be integers") from None
    if any(not 0 <= i < 1 << 63 for i in ids):  # the store's ids are 64-bit: a larger one would be a 500
        raise web.HTTPError(404, "ids and tile indices must be integers from 0 to 2**63 - 1")
    return ids


def handlers(base_url: str) -> list[tuple[str, type[JupyterHandler]]]:
    """The route table, joined onto the server's base URL."""
    seg = r"([^/]+)"  # anything up to a slash; non-integers are refused by the handler with a 404
    routes: list[tuple[str, type[JupyterHandler]]] = [
        ("slides", SlidesHandler),
        (rf"tiles/{seg}/{seg}/{seg}/{seg}\.jpeg", SlideTileHandler),
        (rf"labels/{seg}/{seg}/{seg}/{seg}\.png", LabelTileHandler),
        (rf"prediction/{seg}/{seg}/{seg}/{seg}/{seg}\.png", PredictionTileHandler),
        (rf"errors/{seg}/{seg}/{seg}/{seg}/{seg}\.png", ErrorTileHandler),
        (rf"inference/{seg}/{seg}/{seg}/{seg}\.png", InferenceTileHandler),
        (rf"inference/{seg}/files/{seg}", InferenceFileHandler),
    ]
    return [(url_path_join(base_url, ROUTE_PREFIX, pattern), cls) for pattern, cls in routes]


def load_extension(serverapp: Any) -> None:
    """Build the tile service, add the routes, and tell kernels the base URL through the environment."""
    config = SlideloopTiles(parent=serverapp)
    project_dir = config.project or os.environ.get(PROJECT_ENV, "")
    if project_dir:
        project_dir = str(Path(project_dir).resolve())
        os.environ[PROJECT_ENV] = project_dir  # the app's kernel opens the same project
    kernels.install(serverapp)  # closed Voilà pages shut their kernels down
    if isinstance(serverapp.kernel_manager, kernels.WarmKernelManager):
        serverapp.io_loop.add_callback(serverapp.kernel_manager.refill)
    web_app = serverapp.web_app
    base_url = web_app.settings.get("base_url", "/")
    service = TileService(project_dir, config.workers, config.cache_mb)
    web_app.settings[SETTINGS_KEY] = service
    if project_dir:  # each pool's first thread opens the project and slides now, not on a page's first tiles
        service.warming = [service.pool.submit(service.warm, "slide"),
                           service.overlay_pool.submit(service.warm, "labels")]

        def report(job: Future[int]) -> None:
            if not job.cancelled() and job.exception() is not None:
                serverapp.log.warning("slideloop: tile warm-up failed: %s", job.exception())

        for job in service.warming:
            job.add_done_callback(report)
    web_app.add_handlers(".*$", handlers(base_url))
    # kernels inherit the server's environment: this is how the widgets learn the URL prefix (see DESIGN §2)
    os.environ[BASE_URL_ENV] = base_url
    # make the 'slideloop' Voilà template (no CDN) findable without a data-files install (editable installs)
    paths = [p for p in os.environ.get("JUPYTER_PATH", "").split(os.pathsep) if p]
    if str(DATA_DIR) not in paths:
        os.environ["JUPYTER_PATH"] = os.pathsep.join([*paths, str(DATA_DIR)])
    serverapp.log.info("slideloop tile server at %s (project: %s)", url_path_join(base_url, ROUTE_PREFIX),
                       project_dir or f"none yet; set {PROJECT_ENV}")
