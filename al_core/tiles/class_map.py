"""Overlay tiles of a pyramidal class-map TIFF written by whole-slide inference."""

from __future__ import annotations

import json
import os
import threading
from typing import Any

import numpy as np
import numpy.typing as npt

from al_core.errors import SlideError
from al_core.tiles.cache import LRUCache
from al_core.tiles.pyramid import Pyramid
from al_core.tiles.render import class_map_lut, default_lut, render_overlay_tile
from al_core.wsi.slides import Slide, open_slide


class ClassMapTiles:
    """Overlay tiles of a pyramidal class-map TIFF (:func:`al_core.deploy.infer.infer_slide`'s output, at the slide's
    level-0 geometry), coloured by the classes its description names. Thread-safe: one open slide per
    thread; class indices are sampled nearest-neighbour (never interpolated, which would invent classes)."""

    def __init__(self, path: str | os.PathLike[str], cache: LRUCache | None = None) -> None:
        self.path = str(path)
        self.cache = cache
        self._local = threading.local()
        with self._open() as slide:
            w, h = slide.dimensions
            desc = slide.description
        try:
            meta = json.loads(desc).get("slideloop", {})
        except (json.JSONDecodeError, AttributeError):
            meta = {}
        self.classes: list[dict[str, Any]] = list(meta.get("classes", []))
        self.pyramid = Pyramid(int(w), int(h))
        self.lut = class_map_lut(self.classes) if self.classes else default_lut()

    def _open(self) -> Slide:
        try:
            return open_slide(self.path)
        except SlideError as err:
            raise SlideError(self.path, f"cannot be opened as a class-map TIFF ({err.problem})") from err

    def _slide(self) -> Slide:
        slide: Slide | None = getattr(self._local, "slide", None)
        if slide is None:
            slide = self._local.slide = self._open()
        return slide

    def read(self, z: int, x: int, y: int) -> npt.NDArray[np.uint8]:
        """Class indices (tile x tile, uint8) of tile (z, x, y); padding beyond the map is class 0."""
        pyr = self.pyramid
        pyr.check(z, x, y)
        x0, y0, _, ds = pyr.region(z, x, y)
        w, h = pyr.valid_size(z, x, y)
        slide = self._slide()
        level = slide.best_level(ds)
        lds = slide.level_downsamples[level]
        lw, lh = slide.level_dimensions[level]
        # the level's pixels covering the tile, then the level pixel under each tile pixel's centre
        lx0, ly0 = int(x0 / lds), int(y0 / lds)
        cols = np.minimum(((x0 + (np.arange(w) + 0.5) * ds) / lds).astype(np.int64), lw - 1) - lx0
        rows = np.minimum(((y0 + (np.arange(h) + 0.5) * ds) / lds).astype(np.int64), lh - 1) - ly0
        arr = slide.read_raw((x0, y0), level, (int(cols.max()) + 1, int(rows.max()) + 1))
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
