"""Tiled, compressed, pyramidal TIFF class maps (SubIFDs) that QuPath and OpenSlide-compatible readers open."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from typing import Any

import cv2
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


def _axis(n: int, scale: float, src_n: int) -> npt.NDArray[np.int64]:
    """Source index of each of ``n`` output pixels (nearest, sampled at pixel centres)."""
    return np.minimum(((np.arange(n) + 0.5) / scale).astype(np.int64), src_n - 1)


class _Level:
    """One pyramid level's tiles, sampled nearest-neighbour from ``src`` (whose pixels are ``scale`` output
    pixels wide), one tile row at a time."""

    def __init__(self, src: npt.NDArray[np.uint8], scale: float, size: tuple[int, int], tile: int) -> None:
        self.src, self.size, self.tile = src, size, tile
        self.cols = _axis(size[0], scale, src.shape[1])
        self.rows = _axis(size[1], scale, src.shape[0])
        self.n_rows = math.ceil(size[1] / tile)
        self.uniform: dict[Any, npt.NDArray[np.uint8]] = {}
        # a whole-number upscale that tiles align with (a map at 1 µm/px in a 40x slide's TIFF: x4): a
        # tile is then its source block resized, which OpenCV does ~5x faster than the index gather
        k = round(scale)
        self.up = k if scale >= 1 and abs(scale - k) < 1e-9 and tile % k == 0 else 0

    def rows_needed(self, j: int) -> int:
        """Source rows [0, n) that tile row ``j`` reads."""
        return int(self.rows[min((j + 1) * self.tile, self.size[1]) - 1]) + 1

    def tile_row(self, j: int) -> Iterator[npt.NDArray[np.uint8]]:
        """The tiles of tile row ``j``, left to right, padded to full tiles."""
        tile, (w, _) = self.tile, self.size
        r = self.rows[j * tile:(j + 1) * tile]
        extra = self.src.shape[2:]
        block_rows = self.src[r[0]:r[-1] + 1]  # the source rows under this tile row (upsampled: few)
        strip = None
        for tx in range(0, w, tile):
            c = self.cols[tx:tx + tile]
            full = len(r) == tile and len(c) == tile
            if full and not extra:
                # most tiles of a class map are one class: skip the gather (and reuse the array) for those
                blk = block_rows[:, c[0]:c[-1] + 1]
                v = blk.flat[0]
                if (blk == v).all():
                    if v not in self.uniform:
                        self.uniform[v] = np.full((tile, tile), v, np.uint8)
                    yield self.uniform[v]
                    continue
                if self.up and blk.shape == (tile // self.up, tile // self.up):  # (clipped at an edge: gather)
                    yield np.asarray(cv2.resize(blk, (tile, tile), interpolation=cv2.INTER_NEAREST_EXACT), np.uint8)
                    continue
            if strip is None:
                strip = block_rows[r - r[0]]
            t = strip[:, c]
            if not full:
                t = np.pad(t, [(0, tile - t.shape[0]), (0, tile - t.shape[1])] + [(0, 0)] * len(extra))
            yield np.ascontiguousarray(t)


class _Encoded:
    """The tiles of a pyramid whose rows are still being predicted: level 0's encoded as they are written, the
    lower levels' encoded ahead, tile row by tile row, while level 0 waits for rows (ONNX Runtime leaves the
    cores partly idle then, and the end of a run, after the last batch, is what a user waits for). Holds at
    most ``budget`` bytes ahead; the rest is encoded when its level is written."""

    def __init__(self, levels: list[_Level], encode: Callable[[npt.NDArray[np.uint8]], bytes], budget: int) -> None:
        self.levels, self.encode, self.budget = levels, encode, budget
        self.done = [0] * len(levels)  # tile rows encoded ahead, per level
        self.chunks: list[list[bytes]] = [[] for _ in levels]
        self.held = 0
        self._same: dict[Any, bytes] = {}

    def encode_tile(self, t: npt.NDArray[np.uint8], lvl: _Level) -> bytes:
        """``t`` encoded (a one-class tile's bytes are made once)."""
        v = t.flat[0]
        if t is lvl.uniform.get(v):  # a one-class tile: the same bytes on every level
            if v not in self._same:
                self._same[v] = self.encode(t)
            return self._same[v]
        return self.encode(t)

    def ahead(self, rows_final: int) -> None:
        """Encode every tile row whose source rows are all final, within the budget."""
        for i, lvl in enumerate(self.levels[1:], start=1):
            while self.held < self.budget and self.done[i] < lvl.n_rows and lvl.rows_needed(self.done[i]) <= rows_final:
                for t in lvl.tile_row(self.done[i]):
                    b = self.encode_tile(t, lvl)
                    self.chunks[i].append(b)
                    self.held += len(b)
                self.done[i] += 1

    def tiles(self, i: int) -> Iterator[bytes]:
        """Lower level ``i``'s encoded tiles in file order: those encoded ahead, then the rest."""
        lvl = self.levels[i]
        yield from self.chunks[i]
        self.chunks[i] = []
        for j in range(self.done[i], lvl.n_rows):
            for t in lvl.tile_row(j):
                yield self.encode_tile(t, lvl)


def _live_tiles(lvl: _Level, signal: RowSignal, enc: _Encoded, waited: list[float]) -> Iterator[bytes]:
    """Level 0's encoded tiles, each tile row once its source rows are final; between rows, the lower
    levels' tile rows that became final are encoded ahead."""
    for j in range(lvl.n_rows):
        waited[0] += signal.wait(lvl.rows_needed(j))
        for t in lvl.tile_row(j):
            yield enc.encode_tile(t, lvl)
        enc.ahead(signal.done)


def _wait(signal: RowSignal, lvl: _Level, j: int, waited: list[float]) -> bool:
    waited[0] += signal.wait(lvl.rows_needed(j))
    return True


def _encoder(compression: str, args: dict[str, Any] | None) -> Callable[[npt.NDArray[np.uint8]], bytes]:
    """A tile encoder for ``compression``: tifffile's own, but libdeflate for deflate (a zlib stream like
    zlib's, ~1.6x faster at level 1 and smaller; any TIFF reader decodes it)."""
    import imagecodecs
    import tifffile

    if compression == "none":
        return lambda t: t.tobytes()
    if compression == "deflate" and imagecodecs.DEFLATE.available:
        level = (args or {}).get("level")
        return lambda t: bytes(imagecodecs.deflate_encode(t.tobytes(), level=level))
    tag = {"deflate": tifffile.COMPRESSION.ADOBE_DEFLATE, "zstd": tifffile.COMPRESSION.ZSTD,
           "lzw": tifffile.COMPRESSION.LZW}[compression]
    fn = tifffile.TIFF.COMPRESSORS[int(tag)]
    kwargs = args or {}
    return lambda t: bytes(fn(t, **kwargs))


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
    ahead_budget: int = 256 * 2**20,
) -> tuple[int, float]:
    """Write ``src`` (H, W[, C]) uint8, resampled to ``size`` (w, h), as a tiled pyramidal TIFF (SubIFDs).

    Level k is 2^k times coarser than ``size``; every level is sampled from ``src`` directly (no chain of
    resamplings). The resolution tags give ``mpp`` (µm/px, level 0) in centimetre units, the way tiffslide
    and OpenSlide-compatible readers read it. With ``signal`` (rows still being predicted), the lower levels
    are encoded ahead as their rows become final, holding up to ``ahead_budget`` bytes. Returns (levels,
    seconds spent waiting for rows).
    """
    import tifffile

    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
    comp = None if compression == "none" else compression
    # masks compress well at any level; zlib's default (6) costs ~5x the CPU of level 1 for ~1.7x smaller
    comp_args = {"level": 1} if compression == "deflate" else None
    sizes = pyramid_sizes(*size, min_size=tile)
    levels = [_Level(src, scale / 2**k, wh, tile) for k, wh in enumerate(sizes)]
    waited = [0.0]
    bigtiff = size[0] * size[1] * (src.shape[2] if src.ndim == 3 else 1) > 2**31
    extra_shape = src.shape[2:]
    # encoding here (and the lower levels ahead) only pays while rows are still arriving; with the whole map
    # at hand tifffile's own parallel encoder is faster
    live = (_Encoded(levels, _encoder(compression, comp_args), ahead_budget)
            if signal is not None and not extra_shape else None)
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
            data: Iterator[Any]
            if live is not None and signal is not None:
                data = _live_tiles(levels[0], signal, live, waited) if k == 0 else live.tiles(k)
                opts["compressionargs"] = None  # the bytes are already encoded
            elif k == 0 and signal is not None:
                data = (t for j in range(levels[0].n_rows) if _wait(signal, levels[0], j, waited)
                        for t in levels[0].tile_row(j))
            else:
                data = (t for j in range(levels[k].n_rows) for t in levels[k].tile_row(j))
            tw.write(data, **opts)
    return len(sizes), waited[0]
