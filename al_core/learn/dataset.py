"""Pixels for patches: a per-grid pixel cache inside the project, and the torch dataset for training.

The grid (:mod:`al_core.wsi.grid`) decides which patches exist; this module only reads their pixels and masks,
given the patch rows, a way to open their slides and a way to get their annotations (it never sees the
project). Augmentation is a separate callable passed in (:mod:`al_core.learn.augment`).

Cache layout, under ``<project>/cache/grid-<grid id>/``: ``patches.npy`` (uint8 ``(N, P, P, 3)``, a memmap
in grid order), ``index.json`` (the patch ids of its rows) and ``filled.npy`` (a bool per row). Rows are read
from the slides on first use only; ``filled.npy`` is replaced atomically *after* the pixels are flushed, so a
crash leaves rows marked unfilled, never garbage marked valid. A new grid gets a new folder and the folders of
older grids are deleted, so the cache can never serve pixels of another grid.
"""

from __future__ import annotations

import io
import json
import math
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import torch
from torch.utils.data import Dataset

from al_core._guards import check_free_space
from al_core._io import atomic_path, atomic_write_bytes
from al_core.errors import NoGridError, ProjectError
from al_core.learn.model import ModelConfig
from al_core.project.labels import Annotation
from al_core.project.schema import PatchRow
from al_core.wsi.raster import rasterize
from al_core.wsi.slides import Slide

CACHE_DIR = "cache"
#: opens the slide of a patch row by its slide id (the caller owns the mapping from ids to files)
SlideOpener = Callable[[int], Slide]
#: the current annotations of a slide, oldest first
AnnotationsOf = Callable[[int], Sequence[Annotation]]
#: an augmentation: ``(image HWC uint8, mask HW uint8) -> (image, mask)``
Transform = Callable[[npt.NDArray[np.uint8], npt.NDArray[np.uint8]], tuple[npt.NDArray[np.uint8],
                                                                           npt.NDArray[np.uint8]]]


class PatchCache:
    """uint8 pixels of the current grid's patches, read from the slides once and kept in the project."""

    def __init__(self, directory: Path, grid_id: int, patches: Sequence[PatchRow], open_slide: SlideOpener) -> None:
        """``directory`` is the project's cache folder (``<project>/cache``); ``patches`` are the grid's rows."""
        if not patches:
            raise NoGridError(f"grid {grid_id} has no patches (a lower minimum tissue fraction keeps more)")
        self.grid_id = grid_id
        self.dir = Path(directory) / f"grid-{grid_id}"
        self._open_slide = open_slide
        self.size = patches[0].patch
        self._rows = {p.id: p for p in patches}
        self.ids = [p.id for p in patches]
        self._row_of = {pid: i for i, pid in enumerate(self.ids)}
        self._open()

    def _open(self) -> None:
        index, data, filled = self.dir / "index.json", self.dir / "patches.npy", self.dir / "filled.npy"
        ok = False
        if index.is_file() and data.is_file() and filled.is_file():
            try:
                ok = json.loads(index.read_text()) == {"grid_id": self.grid_id, "size": self.size, "ids": self.ids}
            except (OSError, ValueError):
                ok = False
        if not ok:
            self._create()
        else:
            try:
                self.data = np.load(data, mmap_mode="r+")
                self.filled = np.load(filled)
            except (OSError, ValueError):  # a damaged cache is rebuilt, it holds nothing that cannot be re-read
                self._create()

    def _create(self) -> None:
        root = self.dir.parent
        if root.is_dir():  # older grids' caches are stale for good: the newest grid is the project's grid
            for old in root.glob("grid-*"):
                if old != self.dir:
                    shutil.rmtree(old, ignore_errors=True)
        shape = (len(self.ids), self.size, self.size, 3)
        # the memmap is sparse at first, the disk fills as patches are read: refuse now, not at SIGBUS later
        check_free_space(root, math.prod(shape), f"the patch cache ({len(self.ids):,} patches of {self.size} px)")
        self.dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.dir / "patches.npy") as tmp:
            np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape).flush()
        self.filled = np.zeros(len(self.ids), dtype=bool)
        self._write_filled()
        atomic_write_bytes(self.dir / "index.json",
                           json.dumps({"grid_id": self.grid_id, "size": self.size, "ids": self.ids}).encode())
        self.data = np.load(self.dir / "patches.npy", mmap_mode="r+")

    def _write_filled(self) -> None:
        buf = io.BytesIO()
        np.save(buf, self.filled)
        atomic_write_bytes(self.dir / "filled.npy", buf.getvalue())

    def rows(self, patch_ids: Sequence[int]) -> npt.NDArray[np.int64]:
        """Row numbers of ``patch_ids`` in the cache (ids not in the current grid are an error)."""
        try:
            return np.asarray([self._row_of[int(p)] for p in patch_ids], dtype=np.int64)
        except KeyError as err:
            raise ProjectError(f"patch {err.args[0]} is not in the current grid {self.grid_id}") from err

    def ensure(self, patch_ids: Sequence[int] | None = None,
               progress: Callable[[int, int], None] | None = None) -> None:
        """Read any of ``patch_ids`` (default: all) not cached yet from their slides, one slide open at a time."""
        rows = self.rows(self.ids if patch_ids is None else patch_ids)
        todo = [int(r) for r in rows if not self.filled[r]]
        if not todo:
            return
        by_slide: dict[int, list[int]] = {}
        for r in todo:
            by_slide.setdefault(self._rows[self.ids[r]].slide_id, []).append(r)
        done = 0
        for sid, rs in by_slide.items():
            with self._open_slide(sid) as slide:
                for r in rs:
                    self.data[r] = read_patch(slide, self._rows[self.ids[r]])
                    done += 1
                    if progress is not None:
                        progress(done, len(todo))
            self.data.flush()
            self.filled[rs] = True
            self._write_filled()

    def get(self, patch_ids: Sequence[int]) -> npt.NDArray[np.uint8]:
        """uint8 ``(n, P, P, 3)`` pixels of ``patch_ids`` (read and cached on first use)."""
        self.ensure(patch_ids)
        return np.asarray(self.data[self.rows(patch_ids)])

    def patch(self, patch_id: int) -> PatchRow:
        """The grid row of a patch in the cache."""
        return self._rows[patch_id]


def read_patch(slide: Slide, patch: PatchRow) -> npt.NDArray[np.uint8]:
    """The RGB pixels of a patch row (``patch`` x ``patch``), read from the slide's best level."""
    return slide.read((patch.x, patch.y), (patch.patch, patch.patch), downsample=patch.downsample)


def label_masks(patches: Sequence[PatchRow], annotations_of: AnnotationsOf, config: ModelConfig) -> npt.NDArray[np.uint8]:
    """Masks ``(n, P, P)`` in model channels from the current label geometry; ignore classes → ignore index.

    One annotation query per slide; each patch rasterises the annotations whose bounding box meets it,
    oldest first (later annotations paint over earlier ones).
    """
    lut = config.mask_lut()
    out = np.empty((len(patches), config.patch, config.patch), dtype=np.uint8)
    by_slide: dict[int, list[int]] = {}
    for i, p in enumerate(patches):
        by_slide.setdefault(p.slide_id, []).append(i)
    for sid, idx in by_slide.items():
        anns = annotations_of(sid)
        bounds = np.array([a.geometry.bounds for a in anns], dtype=np.float64).reshape(-1, 4)
        for i in idx:
            p = patches[i]
            x0, y0, x1, y1 = p.x, p.y, p.x + p.size, p.y + p.size
            hit = np.flatnonzero((bounds[:, 2] >= x0) & (bounds[:, 0] <= x1) & (bounds[:, 3] >= y0)
                                 & (bounds[:, 1] <= y1))
            shapes = [(anns[int(j)].class_idx, anns[int(j)].geometry) for j in hit]
            out[i] = lut[rasterize(shapes, (p.x, p.y), p.downsample, (p.patch, p.patch))]
    return out


class PatchDataset(Dataset[dict[str, Any]]):
    """Samples ``{"image": uint8 (3, P, P), "mask": int64 (P, P), "patch_id": int}`` for training.

    Pixels and masks are loaded at construction (a few hundred patches at most per active-learning round),
    so an epoch costs only the augmentation; ``transform`` runs per sample on HWC uint8.
    """

    def __init__(self, images: npt.NDArray[np.uint8], masks: npt.NDArray[np.uint8], patch_ids: Sequence[int],
                 transform: Transform | None = None) -> None:
        if not len(images) == len(masks) == len(patch_ids):
            raise ValueError(f"{len(images)} images, {len(masks)} masks and {len(patch_ids)} ids do not match")
        self.images = images
        self.masks = masks
        self.patch_ids = list(patch_ids)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.patch_ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        img, mask = self.images[i], self.masks[i]
        if self.transform is not None:
            img, mask = self.transform(img, mask)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))),
            "mask": torch.from_numpy(mask.astype(np.int64)),
            "patch_id": self.patch_ids[i],
        }


class PatchSource(Protocol):
    """What a patch cache needs from a project: its folder, current grid, patch rows and slides."""

    root: Path

    def grid_id(self) -> int | None:
        """The current grid's ID (``None``: no grid yet)."""
        ...

    def patches(self) -> list[PatchRow]:
        """The current grid's patch rows."""
        ...

    def open_slide(self, key: int) -> Slide:
        """The slide with ID ``key``, opened for reading."""
        ...


def open_cache(source: PatchSource) -> PatchCache:
    """The pixel cache of ``source``'s current grid."""
    gid = source.grid_id()
    if gid is None:
        raise NoGridError(f"{source.root}: no patch grid yet")
    return PatchCache(source.root / CACHE_DIR, gid, source.patches(), source.open_slide)
