"""Map tiles of a slide and of its label / prediction overlays, as image bytes. No web framework here.

The pyramid follows Leaflet's ``Simple`` CRS: zoom ``zmax = ceil(log2(max(W, H) / 256))`` is level-0
resolution, each zoom below halves it, zoom 0 fits the slide in one tile. Tile (z, x, y) covers the level-0
square of side ``256 * 2**(zmax - z)`` whose top-left is ``(x, y) * that side``; a slide pixel (px, py) is
at (lat, lng) = (-py / 2**zmax, px / 2**zmax).

:class:`TileSource` serves one project: it opens one :class:`~al_core.slides.Slide` per thread (slides are
not thread-safe), keeps hot tiles in a small LRU cache and never touches a path the project did not register.
"""

from __future__ import annotations

import io
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image
from shapely.geometry.base import BaseGeometry

from al_core.errors import ProjectError, SlideError
from al_core.labels import hex_to_rgb, rasterize
from al_core.project import ClassInfo, Project
from al_core.slides import Slide
from al_core.store import ModelRow

TILE = 256
#: JPEG quality of slide tiles: 85 is visually lossless on H&E at half the bytes of 95
JPEG_QUALITY = 85
#: padding of edge tiles beyond the slide: Leaflet's own map background, so the slide's edge is its true edge
PAD_RGB = (221, 221, 221)
#: opacity of class colours inside an overlay tile (the map layer's own opacity slider multiplies it)
OVERLAY_ALPHA = 255


class TileRangeError(ValueError):
    """A tile index outside the pyramid (negative, beyond the slide, or above the top zoom)."""


@dataclass(frozen=True)
class Pyramid:
    """Tile geometry of a ``width`` x ``height`` (level-0 px) slide; pure arithmetic."""

    width: int
    height: int
    tile: int = TILE

    @property
    def zmax(self) -> int:
        """Top zoom, at level-0 resolution: ``ceil(log2(max(W, H) / tile))`` (0 for a slide within one tile)."""
        return max(0, math.ceil(math.log2(max(self.width, self.height) / self.tile)))

    def downsample(self, z: int) -> int:
        """Level-0 pixels per tile pixel at zoom ``z``: ``2**(zmax - z)``."""
        return 2 ** (self.zmax - z)

    def grid_size(self, z: int) -> tuple[int, int]:
        """Number of tiles (columns, rows) at zoom ``z``."""
        side = self.tile * self.downsample(z)
        return math.ceil(self.width / side), math.ceil(self.height / side)

    def check(self, z: int, x: int, y: int) -> None:
        """Raise :class:`TileRangeError` unless (z, x, y) is a tile of this pyramid."""
        if not 0 <= z <= self.zmax:
            raise TileRangeError(f"zoom {z} outside 0..{self.zmax}")
        nx, ny = self.grid_size(z)
        if not (0 <= x < nx and 0 <= y < ny):
            raise TileRangeError(f"tile ({x}, {y}) outside the {nx}x{ny} tiles of zoom {z}")

    def region(self, z: int, x: int, y: int) -> tuple[int, int, int, int]:
        """Level-0 (x0, y0, side, downsample) of tile (z, x, y), with ``side = tile * downsample``."""
        ds = self.downsample(z)
        side = self.tile * ds
        return x * side, y * side, side, ds

    def valid_size(self, z: int, x: int, y: int) -> tuple[int, int]:
        """Output pixels (w, h) of tile (z, x, y) that lie on the slide; the rest is padding."""
        x0, y0, _, ds = self.region(z, x, y)
        return (min(self.tile, math.ceil((self.width - x0) / ds)), min(self.tile, math.ceil((self.height - y0) / ds)))

    def to_latlng(self, px: float, py: float) -> tuple[float, float]:
        """Slide pixel (px, py) → Leaflet (lat, lng) in the Simple CRS."""
        scale = 2.0**self.zmax
        return -py / scale, px / scale

    def from_latlng(self, lat: float, lng: float) -> tuple[float, float]:
        """Leaflet (lat, lng) → slide pixel (px, py)."""
        scale = 2.0**self.zmax
        return lng * scale, -lat * scale

    def bounds(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """The slide as Leaflet bounds ((south, west), (north, east))."""
        return self.to_latlng(0, self.height), self.to_latlng(self.width, 0)


# --- pure rendering -------------------------------------------------------------------------------


def render_slide_tile(slide: Slide, pyramid: Pyramid, z: int, x: int, y: int, quality: int = JPEG_QUALITY) -> bytes:
    """JPEG bytes of slide tile (z, x, y), read from the best level; edge tiles padded with :data:`PAD_RGB`."""
    pyramid.check(z, x, y)
    x0, y0, _, ds = pyramid.region(z, x, y)
    w, h = pyramid.valid_size(z, x, y)
    pixels = slide.read((x0, y0), (w, h), downsample=float(ds))
    if (w, h) != (pyramid.tile, pyramid.tile):
        canvas = np.empty((pyramid.tile, pyramid.tile, 3), dtype=np.uint8)
        canvas[:] = PAD_RGB
        canvas[:h, :w] = pixels
        pixels = canvas
    return encode_jpeg(pixels, quality)


def class_palette(classes: Sequence[ClassInfo]) -> npt.NDArray[np.uint8]:
    """A 256 x 4 RGBA lookup table: class index → its colour, background (0) and unknown indices transparent."""
    lut = np.zeros((256, 4), dtype=np.uint8)
    for c in classes:
        if c.idx > 0:
            lut[c.idx, :3] = hex_to_rgb(c.color)
            lut[c.idx, 3] = OVERLAY_ALPHA
    return lut


def render_label_tile(shapes: Sequence[tuple[int, BaseGeometry]], palette: npt.NDArray[np.uint8], pyramid: Pyramid,
                      z: int, x: int, y: int) -> bytes:
    """RGBA PNG of label geometry (class index, level-0 polygon) over tile (z, x, y); transparent background."""
    pyramid.check(z, x, y)
    if not shapes:
        return empty_png(pyramid.tile)
    x0, y0, _, ds = pyramid.region(z, x, y)
    mask = rasterize(list(shapes), (x0, y0), float(ds), (pyramid.tile, pyramid.tile))
    return encode_png(palette[mask])


#: alpha inside predicted regions; their outlines are opaque, so a prediction reads apart from the filled labels
PREDICTION_FILL_ALPHA = 80


def render_class_tile(mask: npt.NDArray[np.uint8], palette: npt.NDArray[np.uint8]) -> bytes:
    """RGBA PNG of a class-index tile (e.g. an argmax prediction): class outlines opaque, insides faint."""
    if not mask.any():
        return empty_png(mask.shape[1])
    rgba = palette[mask]
    edge = class_edges(mask)
    rgba[..., 3] = np.where(mask > 0, np.where(edge, rgba[..., 3], np.minimum(rgba[..., 3], PREDICTION_FILL_ALPHA)), 0)
    return encode_png(rgba)


def class_edges(mask: npt.NDArray[np.uint8]) -> npt.NDArray[np.bool_]:
    """Outline pixels of a class map: a neighbour within 1 px has another class (2-px lines at screen scale)."""
    edge = np.zeros(mask.shape, dtype=bool)
    for axis in (0, 1):
        step = np.diff(mask, axis=axis) != 0
        pad = [(0, 0), (0, 0)]
        pad[axis] = (1, 0)
        edge |= np.pad(step, pad)
        pad[axis] = (0, 1)
        edge |= np.pad(step, pad)
    return edge


def paste_patch_classes(tile: npt.NDArray[np.uint8], classes: npt.NDArray[np.uint8], patch_origin: tuple[int, int],
                        patch_size: int, tile_origin: tuple[int, int], tile_ds: int) -> None:
    """Resample a patch's class map (covering ``patch_size`` level-0 px at ``patch_origin``) into ``tile``
    (whose pixels are ``tile_ds`` level-0 px from ``tile_origin``), nearest neighbour, in place."""
    th, tw = tile.shape
    # level-0 centre of each tile pixel, then the patch pixel that covers it
    cx = tile_origin[0] + (np.arange(tw) + 0.5) * tile_ds
    cy = tile_origin[1] + (np.arange(th) + 0.5) * tile_ds
    ph, pw = classes.shape
    col = np.floor((cx - patch_origin[0]) * pw / patch_size).astype(np.int64)
    row = np.floor((cy - patch_origin[1]) * ph / patch_size).astype(np.int64)
    cols = np.flatnonzero((col >= 0) & (col < pw))
    rows = np.flatnonzero((row >= 0) & (row < ph))
    if cols.size and rows.size:
        tile[np.ix_(rows, cols)] = classes[np.ix_(row[rows], col[cols])]


def encode_jpeg(rgb: npt.NDArray[np.uint8], quality: int = JPEG_QUALITY) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def encode_png(rgba: npt.NDArray[np.uint8]) -> bytes:
    # compress_level 1: level 6 costs ~3x the time for ~10 % fewer bytes on flat class colours
    buf = io.BytesIO()
    Image.fromarray(rgba, mode="RGBA").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


_EMPTY: dict[int, bytes] = {}


def empty_png(size: int = TILE) -> bytes:
    """A fully transparent tile (the same bytes every time, so browsers and the cache share it)."""
    if size not in _EMPTY:
        _EMPTY[size] = encode_png(np.zeros((size, size, 4), dtype=np.uint8))
    return _EMPTY[size]


# --- a project's tiles ----------------------------------------------------------------------------


class LRUCache:
    """A thread-safe least-recently-used cache of tile bytes, bounded by total bytes."""

    def __init__(self, max_bytes: int = 64 << 20) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple[Any, ...], bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: tuple[Any, ...]) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return data

    def put(self, key: tuple[Any, ...], data: bytes) -> None:
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= len(old)
            self._items[key] = data
            self._bytes += len(data)
            while self._bytes > self.max_bytes and self._items:
                _, dropped = self._items.popitem(last=False)
                self._bytes -= len(dropped)

    def __len__(self) -> int:
        return len(self._items)


@dataclass(frozen=True)
class SlideInfo:
    """What a tile client needs to know about a registered slide (no file path: ids only leave the server)."""

    id: int
    name: str
    width: int
    height: int
    mpp: float | None

    @property
    def pyramid(self) -> Pyramid:
        return Pyramid(self.width, self.height)


#: ``(project, model_id, patch_id) -> uint8 (h, w)`` a patch's predicted project class indices covering the
#: patch's level-0 square (``al_core.predict.prediction_classes``); raises ProjectError for an unpredicted patch
PredictionLoader = Callable[[Project, int, int], npt.NDArray[np.uint8]]


class TileSource:
    """Slide, label and prediction tiles of one project. Thread-safe; call from a thread pool."""

    def __init__(self, project: Project, cache_bytes: int = 64 << 20,
                 prediction_loader: PredictionLoader | None = None) -> None:
        self.project = project
        self.cache = LRUCache(cache_bytes)
        self._local = threading.local()
        self._prediction_loader = prediction_loader
        self._info: dict[int, SlideInfo] = {}
        self._info_lock = threading.Lock()
        self._patches: dict[tuple[int, int | None], list[Any]] = {}
        self._models: set[int] = set()

    def slide_info(self, slide_id: int) -> SlideInfo:
        """Metadata of a registered slide; :class:`~al_core.errors.ProjectError` for an unknown id."""
        with self._info_lock:
            info = self._info.get(slide_id)
        if info is None:
            row = self.project.slide_row(int(slide_id))
            info = SlideInfo(row.id, row.name, row.width, row.height, row.mpp)
            with self._info_lock:
                self._info[slide_id] = info
        return info

    def _slide(self, slide_id: int) -> Slide:
        # one open Slide per (thread, slide): tiffslide handles are not safe to share between threads
        slides: dict[int, Slide] = self._local.__dict__.setdefault("slides", {})
        slide = slides.get(slide_id)
        if slide is None:
            slide = self.project.open_slide(slide_id)  # path from the project's own row, never from a URL
            slides[slide_id] = slide
        return slide

    def slide_tile(self, slide_id: int, z: int, x: int, y: int) -> bytes:
        """JPEG bytes of a slide tile. Raises ProjectError (unknown id), TileRangeError, SlideError (file)."""
        info = self.slide_info(slide_id)
        info.pyramid.check(z, x, y)
        key = ("slide", slide_id, z, x, y)
        data = self.cache.get(key)
        if data is None:
            try:
                data = render_slide_tile(self._slide(slide_id), info.pyramid, z, x, y)
            except SlideError:
                self._forget(slide_id)  # the file may come back (remounted share): reopen next time
                raise
            self.cache.put(key, data)
        return data

    def label_tile(self, slide_id: int, z: int, x: int, y: int) -> bytes:
        """RGBA PNG of the slide's current labels over one tile."""
        info = self.slide_info(slide_id)
        pyr = info.pyramid
        pyr.check(z, x, y)
        version = self.project.label_version(slide_id)
        key = ("labels", slide_id, version, z, x, y)
        data = self.cache.get(key)
        if data is None:
            x0, y0, side, _ = pyr.region(z, x, y)
            shapes = [(c, g) for _, c, g in self.project.annotations(slide_id, region=(x0, y0, x0 + side, y0 + side))]
            data = render_label_tile(shapes, class_palette(self.project.classes()), pyr, z, x, y)
            self.cache.put(key, data)
        return data

    def prediction_tile(self, slide_id: int, model_id: int, z: int, x: int, y: int) -> bytes:
        """RGBA PNG of a model's argmax prediction over one tile, from the patches it predicted."""
        if self._prediction_loader is None:
            raise ProjectError("no prediction support installed (al_core.predict is missing)")
        info = self.slide_info(slide_id)
        pyr = info.pyramid
        pyr.check(z, x, y)
        self._check_model(model_id)
        key = ("prediction", slide_id, model_id, z, x, y)
        data = self.cache.get(key)
        if data is None:
            x0, y0, side, ds = pyr.region(z, x, y)
            tile = np.zeros((pyr.tile, pyr.tile), dtype=np.uint8)
            for p in self._slide_patches(slide_id):
                if p.x >= x0 + side or p.y >= y0 + side or p.x + p.size <= x0 or p.y + p.size <= y0:
                    continue
                try:
                    classes = np.asarray(self._prediction_loader(self.project, model_id, p.id), dtype=np.uint8)
                except (ProjectError, FileNotFoundError, KeyError):
                    continue  # this patch was not predicted by that model (e.g. a newer grid)
                paste_patch_classes(tile, classes, (p.x, p.y), p.size, (x0, y0), ds)
            data = render_class_tile(tile, class_palette(self.project.classes()))
            self.cache.put(key, data)
        return data

    def _check_model(self, model_id: int) -> None:
        with self._info_lock:
            if model_id in self._models:
                return
        with self.project.store.read() as s:
            row = s.get(ModelRow, model_id)
        if row is None or row.status != "done":
            raise ProjectError(f"no finished model {model_id} in the project")
        with self._info_lock:
            self._models.add(model_id)

    def _slide_patches(self, slide_id: int) -> list[Any]:
        # the patch list changes only with a new grid; one query per grid, not per tile
        key = (slide_id, self.project.grid_id())
        with self._info_lock:
            patches = self._patches.get(key)
        if patches is None:
            patches = self.project.patches(slide_id)
            with self._info_lock:
                self._patches[key] = patches
        return patches

    def _forget(self, slide_id: int) -> None:
        slides: dict[int, Slide] = self._local.__dict__.get("slides", {})
        slide = slides.pop(slide_id, None)
        if slide is not None:
            slide.close()

    def close(self) -> None:
        """Close this thread's open slides (other threads' handles close with their threads)."""
        for sid in list(self._local.__dict__.get("slides", {})):
            self._forget(sid)


# --- class-map TIFFs written by whole-slide inference ----------------------------------------------

#: alpha inside regions of an inference overlay; outlines stay opaque (the layer's opacity slider multiplies both)
CLASS_MAP_FILL_ALPHA = 110


def render_overlay_tile(mask: npt.NDArray[np.uint8], lut: npt.NDArray[np.uint8],
                        fill_alpha: int = CLASS_MAP_FILL_ALPHA) -> bytes:
    """RGBA PNG of a class-index tile through a 256 x 4 ``lut``: classes with alpha 0 in the table (background)
    are transparent, the others have opaque outlines and ``fill_alpha`` insides."""
    visible = lut[mask, 3] > 0
    if not visible.any():
        return empty_png(mask.shape[1])
    rgba = lut[mask]
    edge = class_edges(mask)
    rgba[..., 3] = np.where(visible, np.where(edge, rgba[..., 3], np.minimum(rgba[..., 3], fill_alpha)), 0)
    return encode_png(rgba)


def class_map_lut(classes: Sequence[dict[str, Any]], background: int | None = None) -> npt.NDArray[np.uint8]:
    """256 x 4 RGBA table from ``[{"index", "name", "color"}, ...]`` (a class map's metadata): each class its
    colour, the background class (named 'background', else ``background``, else the lowest index) transparent."""
    lut = np.zeros((256, 4), dtype=np.uint8)
    if not classes:
        return lut
    if background is None:
        named = [int(c["index"]) for c in classes if str(c.get("name", "")).lower() == "background"]
        background = named[0] if named else min(int(c["index"]) for c in classes)
    for c in classes:
        i = int(c["index"])
        if i != background and 0 <= i < 256:
            lut[i, :3] = hex_to_rgb(str(c.get("color") or "#808080"))
            lut[i, 3] = OVERLAY_ALPHA
    return lut


class ClassMapTiles:
    """Overlay tiles of a pyramidal class-map TIFF (:func:`al_core.infer.infer_slide`'s output, at the slide's
    level-0 geometry), coloured by the classes its description names. Thread-safe: one tiffslide handle per
    thread; class indices are sampled nearest-neighbour (never interpolated, which would invent classes)."""

    def __init__(self, path: str | Any, cache: LRUCache | None = None) -> None:
        import json

        import tiffslide

        self.path = str(path)
        self.cache = cache
        self._local = threading.local()
        try:
            ts = tiffslide.TiffSlide(self.path)
        except Exception as err:  # tifffile/tiffslide raise many types for a broken file
            raise SlideError(self.path, f"cannot be opened as a class-map TIFF ({err})") from err
        try:
            w, h = ts.dimensions
            desc = ts.properties.get("tiff.ImageDescription") or ""
        finally:
            ts.close()
        try:
            meta = json.loads(desc).get("slideloop", {})
        except (json.JSONDecodeError, AttributeError):
            meta = {}
        self.classes: list[dict[str, Any]] = list(meta.get("classes", []))
        self.pyramid = Pyramid(int(w), int(h))
        self.lut = class_map_lut(self.classes) if self.classes else _default_lut()

    def _slide(self) -> Any:
        ts = getattr(self._local, "slide", None)
        if ts is None:
            import tiffslide

            ts = self._local.slide = tiffslide.TiffSlide(self.path)
        return ts

    def read(self, z: int, x: int, y: int) -> npt.NDArray[np.uint8]:
        """Class indices (tile x tile, uint8) of tile (z, x, y); padding beyond the map is class 0."""
        pyr = self.pyramid
        pyr.check(z, x, y)
        x0, y0, _, ds = pyr.region(z, x, y)
        w, h = pyr.valid_size(z, x, y)
        ts = self._slide()
        level = ts.get_best_level_for_downsample(ds)
        lds = float(ts.level_downsamples[level])
        lw, lh = ts.level_dimensions[level]
        # the level's pixels covering the tile, then level pixel under each tile pixel's centre
        lx0, ly0 = int(x0 / lds), int(y0 / lds)
        cols = np.minimum(((x0 + (np.arange(w) + 0.5) * ds) / lds).astype(np.int64), lw - 1) - lx0
        rows = np.minimum(((y0 + (np.arange(h) + 0.5) * ds) / lds).astype(np.int64), lh - 1) - ly0
        rw, rh = int(cols.max()) + 1, int(rows.max()) + 1
        arr = np.asarray(ts.read_region((x0, y0), level, (rw, rh), as_array=True))
        if arr.ndim == 3:
            arr = arr[..., 0]
        tile = np.zeros((pyr.tile, pyr.tile), dtype=np.uint8)
        tile[:h, :w] = arr[np.ix_(rows, cols)]
        return tile

    def tile(self, z: int, x: int, y: int) -> bytes:
        """RGBA PNG of tile (z, x, y): class outlines opaque, insides :data:`CLASS_MAP_FILL_ALPHA`."""
        key = ("class_map", self.path, z, x, y)
        data = self.cache.get(key) if self.cache is not None else None
        if data is None:
            data = render_overlay_tile(self.read(z, x, y), self.lut)
            if self.cache is not None:
                self.cache.put(key, data)
        return data


def _default_lut() -> npt.NDArray[np.uint8]:
    # a class map without slideloop metadata: index 0 is background, others get fixed distinct colours
    colours = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45"]
    return class_map_lut([{"index": i, "color": colours[(i - 1) % len(colours)]} for i in range(256)], background=0)
