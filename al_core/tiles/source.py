"""Slide, label and prediction tiles of one project.

:class:`TileSource` opens one :class:`~al_core.wsi.slides.Slide` per thread (slides are not thread-safe), keeps
hot tiles in a small LRU cache and never touches a path the project did not register.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from al_core.errors import ProjectError, SlideError
from al_core.project.project import Project
from al_core.project.schema import ModelRow
from al_core.tiles.cache import LRUCache
from al_core.tiles.pyramid import Pyramid
from al_core.tiles.render import (
    class_palette,
    error_classes,
    paste_patch_classes,
    render_class_tile,
    render_error_tile,
    render_outlined_label_tile,
    render_slide_tile,
)
from al_core.wsi.raster import rasterize
from al_core.wsi.slides import Slide


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
        """The slide's tile geometry."""
        return Pyramid(self.width, self.height)


class TileSource:
    """Slide, label and prediction tiles of one project. Thread-safe; call from a thread pool."""

    def __init__(self, project: Project, cache_bytes: int = 64 << 20) -> None:
        self.project = project
        self.cache = LRUCache(cache_bytes)
        self._local = threading.local()
        self._info: dict[int, SlideInfo] = {}
        self._info_lock = threading.Lock()
        self._patches: dict[tuple[int, int | None], list[Any]] = {}
        self._models: set[int] = set()
        self._labelled_ids: dict[tuple[int, int], set[int]] = {}

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
        version = self.project.labels.version(slide_id)
        key = ("labels", slide_id, version, z, x, y)
        data = self.cache.get(key)
        if data is None:
            x0, y0, side, _ = pyr.region(z, x, y)
            anns = self.project.labels.annotations(slide_id, region=(x0, y0, x0 + side, y0 + side))
            shapes = [(a.class_idx, a.geometry) for a in anns]
            data = render_outlined_label_tile(shapes, class_palette(self.project.classes()), pyr, z, x, y)
            self.cache.put(key, data)
        return data

    def prediction_tile(self, slide_id: int, model_id: int, z: int, x: int, y: int) -> bytes:
        """RGBA PNG of a model's argmax prediction over one tile, from the patches it predicted."""
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
                    classes = self.project.predictions.classes(model_id, p.id)
                except (ProjectError, FileNotFoundError, KeyError):
                    continue  # this patch was not predicted by that model (e.g. a newer grid)
                paste_patch_classes(tile, classes, (p.x, p.y), p.size, (x0, y0), ds)
            data = render_class_tile(tile, class_palette(self.project.classes()))
            self.cache.put(key, data)
        return data

    def error_tile(self, slide_id: int, model_id: int, z: int, x: int, y: int) -> bytes:
        """RGBA PNG of where a model's prediction and the current label disagree, over the labelled patches
        the model predicted: false positives and false negatives in two colours."""
        info = self.slide_info(slide_id)
        pyr = info.pyramid
        pyr.check(z, x, y)
        self._check_model(model_id)
        version = self.project.labels.version(slide_id)
        key = ("errors", slide_id, model_id, version, z, x, y)
        data = self.cache.get(key)
        if data is None:
            x0, y0, side, ds = pyr.region(z, x, y)
            pred = np.zeros((pyr.tile, pyr.tile), dtype=np.uint8)
            covered = np.zeros((pyr.tile, pyr.tile), dtype=np.uint8)
            labelled = self._labelled(slide_id, version)
            for p in self._slide_patches(slide_id):
                if p.id not in labelled or p.x >= x0 + side or p.y >= y0 + side or p.x + p.size <= x0 \
                        or p.y + p.size <= y0:
                    continue
                try:
                    classes = self.project.predictions.classes(model_id, p.id)
                except (ProjectError, FileNotFoundError, KeyError):
                    continue
                paste_patch_classes(pred, classes, (p.x, p.y), p.size, (x0, y0), ds)
                paste_patch_classes(covered, np.ones_like(classes), (p.x, p.y), p.size, (x0, y0), ds)
            anns = self.project.labels.annotations(slide_id, region=(x0, y0, x0 + side, y0 + side))
            label = rasterize([(a.class_idx, a.geometry) for a in anns], (x0, y0), float(ds), (pyr.tile, pyr.tile))
            data = render_error_tile(error_classes(pred, label, covered.astype(bool)))
            self.cache.put(key, data)
        return data

    def _labelled(self, slide_id: int, version: int) -> set[int]:
        # which patches count as labelled changes only with a new label version
        key = (slide_id, version)
        with self._info_lock:
            ids = self._labelled_ids.get(key)
        if ids is None:
            ids = self.project.labelled_patch_ids(slide_id)
            with self._info_lock:
                self._labelled_ids = {key: ids}
        return ids

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
