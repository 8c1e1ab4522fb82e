"""Tiled, compressed, pyramidal TIFF class maps (SubIFDs) that QuPath and OpenSlide-compatible readers open."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt

from al_core import __version__
from al_core._io import atomic_path
from al_core.deploy.stitch import RowSignal

COMPRESSIONS = ("deflate", "zstd", "lzw", "none")


def pyramid_sizes(width: int, height: int, min_size: int = 512) -> list[tuple[int, int]]:
    """(w, h) of each level: halving until the long side is at most ``min_size``."""
    sizes = [(width, height)]
    while max(sizes[-1]) > min_size:
        w, h = sizes[-1]
        sizes.append((max(1, math.ceil(w / 2)), max(1, math.ceil(h / 2))))
    return sizes


def _tiles(src: npt.NDArray[np.uint8], scale: float, size: tuple[int, int], tile: int,
           signal: RowSignal | None, waited: list[float]) -> Iterator[npt.NDArray[np.uint8]]:
    """Tiles (row-major) of a ``size`` image sampled nearest-neighbour from ``src``, whose pixels are
    ``scale`` output pixels wide; waits for rows still being predicted when ``signal`` is given."""
    w, h = size
    sh, sw = src.shape[:2]
    cols = np.minimum(((np.arange(w) + 0.5) / scale).astype(np.int64), sw - 1)
    rows = np.minimum(((np.arange(h) + 0.5) / scale).astype(np.int64), sh - 1)
    extra = src.shape[2:]
    uniform: dict[Any, npt.NDArray[np.uint8]] = {}
    for ty in range(0, h, tile):
        r = rows[ty:ty + tile]
        if signal is not None:
            waited[0] += signal.wait(int(r[-1]) + 1)
        block_rows = src[r[0]:r[-1] + 1]  # the source rows under this tile row (upsampled: few)
        strip = None
        for tx in range(0, w, tile):
            c = cols[tx:tx + tile]
            full = len(r) == tile and len(c) == tile
            if full and not extra:
                # most tiles of a class map are one class: skip the gather (and reuse the array) for those
                blk = block_rows[:, c[0]:c[-1] + 1]
                v = blk.flat[0]
                if (blk == v).all():
                    if v not in uniform:
                        uniform[v] = np.full((tile, tile), v, np.uint8)
                    yield uniform[v]
                    continue
            if strip is None:
                strip = block_rows[r - r[0]]
            t = strip[:, c]
            if not full:
                t = np.pad(t, [(0, tile - t.shape[0]), (0, tile - t.shape[1])] + [(0, 0)] * len(extra))
            yield np.ascontiguousarray(t)


def write_pyramid(
    path: str | os.PathLike[str],
    src: npt.NDArray[np.uint8],
    scale: float,
    size: tuple[int, int],
    mpp: float | None,
    *,
    compression: str = "deflate",
    tile: int = 512,
    description: str = "",
    signal: RowSignal | None = None,
) -> tuple[int, float]:
    """Write ``src`` (H, W[, C]) uint8, resampled to ``size`` (w, h), as a tiled pyramidal TIFF (SubIFDs).

    Level k is 2^k times coarser than ``size``; every level is sampled from ``src`` directly (no chain of
    resamplings). The resolution tags give ``mpp`` (µm/px, level 0) in centimetre units, the way tiffslide
    and OpenSlide-compatible readers read it. Returns (levels, seconds spent waiting for rows).
    """
    import tifffile

    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
    comp = None if compression == "none" else compression
    # masks compress well at any level; zlib's default (6) costs ~5x the CPU of level 1 for ~1.7x smaller
    comp_args = {"level": 1} if compression == "deflate" else None
    sizes = pyramid_sizes(*size, min_size=tile)
    waited = [0.0]
    bigtiff = size[0] * size[1] * (src.shape[2] if src.ndim == 3 else 1) > 2**31
    extra_shape = src.shape[2:]
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tw:
        for k, (w, h) in enumerate(sizes):
            opts: dict[str, Any] = {"tile": (tile, tile), "compression": comp, "compressionargs": comp_args,
                                    "photometric": "minisblack",
                                    "dtype": np.uint8, "shape": (h, w, *extra_shape), "metadata": None}
            if extra_shape:  # samples per pixel in one plane; they are not colour channels
                opts.update(planarconfig="contig", extrasamples=(0,) * (extra_shape[0] - 1))
            if mpp is not None:
                res = 1e4 / (mpp * 2**k)
                opts.update(resolution=(res, res), resolutionunit="CENTIMETER")
            if k == 0:
                opts.update(subifds=len(sizes) - 1, description=description, software=f"slideloop {__version__}")
            else:
                opts.update(subfiletype=1)
            tw.write(_tiles(src, scale / 2**k, (w, h), tile, signal if k == 0 else None, waited), **opts)
    return len(sizes), waited[0]
