"""Tissue patches read a grid row at a time: neighbouring patches of one row share a single region read.

A slide's tiles are larger than the patches that overlap them (512² JPEG tiles under 256² patches), so reading
each patch on its own decodes most tiles several times over. Reading the run of patches that touch each other
on one row as one region, and cutting the patches out of it, decodes each tile of the run once, where that
gives the same pixels (:func:`cuts_exactly`).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import numpy.typing as npt

from al_core.wsi.slides import Slide

#: patches read as one region at most (bounds the region: 16 × 512² RGB is 12 MB)
MAX_RUN = 16


def row_runs(xs: npt.NDArray[np.int64], ys: npt.NDArray[np.int64], patch: int,
             max_run: int = MAX_RUN) -> list[tuple[int, int]]:
    """``[start, stop)`` index ranges of consecutive patches on one row whose squares overlap or touch (at most
    ``max_run`` each), in the patches' order; patch corners are in the same pixels as ``patch``."""
    runs: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(xs)):
        if ys[i] != ys[start] or not 0 < xs[i] - xs[i - 1] <= patch or i - start >= max_run:
            runs.append((start, i))
            start = i
    if len(xs):
        runs.append((start, len(xs)))
    return runs


def read_run(slide: Slide, xs: npt.NDArray[np.int64], y: int, ds: float, patch: int) -> npt.NDArray[np.uint8]:
    """The ``patch``² RGB patches at model-pixel corners ``(xs[k], y)`` of one run, from one region read ``ds``
    times down from level 0: (n, patch, patch, 3)."""
    x0 = int(xs[0])
    width = int(xs[-1]) - x0 + patch
    region = slide.read((round(x0 * ds), round(y * ds)), (width, patch), downsample=ds)
    return np.stack([region[:, int(x) - x0:int(x) - x0 + patch] for x in xs])


def cuts_exactly(slide: Slide, ds: float) -> bool:
    """Whether a run read ``ds`` times down cuts the very pixels single-patch reads give: a whole-number
    downsample read from a level with a whole-number downsample dividing it (every corner on that level's pixel
    grid, one block-average resize). Otherwise (an SVS level at ×4.0003, 0.2525 µm/px read at 1 µm/px) each
    patch is read on its own, rounded as training and prediction read it, so a deployed model sees the pixels
    it was trained and checked on."""
    level_ds = slide.level_downsamples[slide.best_level(ds)]
    return all(abs(v - round(v)) < 1e-9 for v in (ds, level_ds, ds / level_ds))


def read_patches(slide: Slide, xs: npt.NDArray[np.int64], ys: npt.NDArray[np.int64], ds: float, patch: int,
                 batch_size: int) -> Iterator[tuple[slice, npt.NDArray[np.uint8]]]:
    """Batches of ``batch_size`` patches (the last may be smaller) in the given order, as (index slice, RGB)."""
    pending: list[npt.NDArray[np.uint8]] = []
    done = 0
    for start, stop in row_runs(xs, ys, patch, MAX_RUN if cuts_exactly(slide, ds) else 1):
        pending.extend(read_run(slide, xs[start:stop], int(ys[start]), ds, patch))
        while len(pending) >= batch_size:
            yield slice(done, done + batch_size), np.stack(pending[:batch_size])
            done += batch_size
            del pending[:batch_size]
    if pending:
        yield slice(done, done + len(pending)), np.stack(pending)
