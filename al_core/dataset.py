"""Pixels for patches: a per-grid pixel cache inside the project, and the torch dataset for training.

The grid (``al_core.grid``) decides which patches exist; this module only reads their pixels and masks.
Augmentation is a separate callable passed in (``al_core.augment``).

Cache layout, under ``<project>/cache/grid-<grid id>/``: ``patches.npy`` (uint8 ``(N, P, P, 3)``, a memmap
in grid order), ``index.json`` (the patch ids of its rows) and ``filled.npy`` (a bool per row). Rows are read
from the slides on first use only; ``filled.npy`` is replaced atomically *after* the pixels are flushed, so a
crash leaves rows marked unfilled, never garbage marked valid. A new grid gets a new folder and the folders of
older grids are deleted, so the cache can never serve pixels of another grid.
"""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch.utils.data import Dataset

from al_core._io import atomic_path, atomic_write_bytes
from al_core.errors import ProjectError
from al_core.labels import rasterize
from al_core.model import ModelConfig
from al_core.project import Project
from al_core.store import PatchRow

CACHE_DIR = "cache"
#: an augmentation: ``(image HWC uint8, mask HW uint8) -> (image, mask)``
Transform = Callable[[npt.NDArray[np.uint8], npt.NDArray[np.uint8]], tuple[npt.NDArray[np.uint8],
                                                                           npt.NDArray[np.uint8]]]


class PatchCache:
    """uint8 pixels of the current grid's patches, read from the slides once and kept in the project."""

    def __init__(self, project: Project) -> None:
        gid = project.grid_id()
        if gid is None:
            raise ProjectError(f"{project.root}: no patch grid yet (run 'slideloop grid')")
        self.project = project
        self.grid_id = gid
        self.dir = project.root / CACHE_DIR / f"grid-{gid}"
        patches = project.patches()
        if not patches:
            raise ProjectError(f"{project.root}: the grid has no patches (lower --min-tissue?)")
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
        self.dir.mkdir(parents=True, exist_ok=True)
        shape = (len(self.ids), self.size, self.size, 3)
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
            with self.project.open_slide(sid) as slide:
                for r in rs:
                    self.data[r] = self.project.read_patch(self._rows[self.ids[r]], slide)
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
        return self._rows[patch_id]


def label_masks(project: Project, patches: Sequence[PatchRow], config: ModelConfig) -> npt.NDArray[np.uint8]:
    """Masks ``(n, P, P)`` in model channels from the current label geometry; ignore classes → ignore index.

    Same result as :meth:`Project.label_mask` per patch, with one annotation query per slide instead of one
    per patch (the bounding-box filter is the same, done in numpy).
    """
    lut = config.mask_lut()
    out = np.empty((len(patches), config.patch, config.patch), dtype=np.uint8)
    by_slide: dict[int, list[int]] = {}
    for i, p in enumerate(patches):
        by_slide.setdefault(p.slide_id, []).append(i)
    for sid, idx in by_slide.items():
        anns = project.annotations(sid)  # oldest first, as label_mask paints them
        bounds = np.array([g.bounds for _, _, g in anns], dtype=np.float64).reshape(-1, 4)
        for i in idx:
            p = patches[i]
            x0, y0, x1, y1 = p.x, p.y, p.x + p.size, p.y + p.size
            hit = np.flatnonzero((bounds[:, 2] >= x0) & (bounds[:, 0] <= x1) & (bounds[:, 3] >= y0)
                                 & (bounds[:, 1] <= y1))
            shapes = [(anns[j][1], anns[j][2]) for j in hit]
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

    @classmethod
    def from_project(cls, project: Project, patch_ids: Sequence[int], config: ModelConfig,
                     cache: PatchCache | None = None, transform: Transform | None = None) -> PatchDataset:
        cache = cache or PatchCache(project)
        images = cache.get(patch_ids)
        masks = label_masks(project, [cache.patch(p) for p in patch_ids], config)
        return cls(images, masks, patch_ids, transform)

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


def cache_dir(project: Project) -> Path:
    return project.root / CACHE_DIR
