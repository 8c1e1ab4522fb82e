"""Blending overlapping patch predictions into a class map: a cosine-ramped window and a strip buffer one
patch high that finalises rows as soon as no later patch can touch them.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from al_core.deploy.config import InferenceConfig
from al_core.errors import InferenceError

#: class maps larger than this many bytes live in a temporary memmap instead of RAM
MEMMAP_BYTES = 256 << 20


def blend_window(size: int, overlap: int) -> npt.NDArray[np.float32]:
    """2-D weights: 1 in the middle, a raised-cosine ramp over ``overlap`` px at each edge.

    Neighbours cross-fade over their overlap instead of meeting at a seam; the ramp never reaches 0 so a
    pixel covered by one patch only (the slide border) still has a defined value.
    """
    w = np.ones(size, np.float32)
    if overlap > 0:
        i = np.arange(overlap, dtype=np.float32)
        ramp = 0.5 - 0.5 * np.cos(np.pi * (i + 0.5) / overlap)
        w[:overlap] = np.minimum(w[:overlap], ramp)
        w[size - overlap:] = np.minimum(w[size - overlap:], ramp[::-1])
    return np.outer(w, w)


class RowSignal:
    """Rows [0, done) of the class map are final; waiters are woken as it grows (or on abort)."""

    def __init__(self) -> None:
        self.done = 0
        self.failed = False
        self._cv = threading.Condition()

    def advance(self, rows: int) -> None:
        """Mark rows [0, ``rows``) final and wake the waiters."""
        with self._cv:
            self.done = max(self.done, rows)
            self._cv.notify_all()

    def abort(self) -> None:
        """Mark the run failed and wake the waiters, whose :meth:`wait` then raises."""
        with self._cv:
            self.failed = True
            self._cv.notify_all()

    def wait(self, rows: int) -> float:
        """Block until rows [0, ``rows``) are final; returns the seconds waited.

        Raises ``InferenceError`` when the run was aborted."""
        t = time.perf_counter()
        with self._cv:
            while self.done < rows and not self.failed:
                self._cv.wait(0.5)
        if self.failed:
            raise InferenceError("inference failed; output abandoned")
        return time.perf_counter() - t


class StripBlender:
    """Blends patch probabilities into a buffer one patch high and finalises rows above the current patch
    row into the class map (and optional quantised probabilities)."""

    def __init__(self, n_ch: int, width: int, height: int, patch: int, window: npt.NDArray[np.float32],
                 decide: Callable[[npt.NDArray[np.float32]], npt.NDArray[np.uint8]],
                 cmap: npt.NDArray[np.uint8], probs: npt.NDArray[np.uint8] | None, signal: RowSignal,
                 background: int, tissue: tuple[npt.NDArray[np.bool_], float] | None = None) -> None:
        self.acc = np.zeros((n_ch, patch, width), np.float32)
        self.wsum = np.zeros((patch, width), np.float32)
        self.y0 = 0
        self.width, self.height, self.patch = width, height, patch
        self.window, self.decide = window, decide
        self.cmap, self.probs, self.signal, self.background = cmap, probs, signal, background
        # (tissue mask, its pixel size in class-map pixels): pixels outside the tissue are background
        self.tissue = tissue
        if tissue is not None:
            tm, tscale = tissue
            self._tcols = np.minimum(((np.arange(width) + 0.5) / tscale).astype(np.int64), tm.shape[1] - 1)

    def add(self, x: int, y: int, prob: npt.NDArray[np.float32]) -> None:
        """Add one patch's probabilities (channels × h × w) at class-map pixel ``(x, y)``, weighted by the window.

        Patches come in row order: one on a lower row first finalises the rows above its top."""
        if y > self.y0:
            self.flush(y)
        ph, pw = prob.shape[1:]
        h, w = min(ph, self.height - y), min(pw, self.width - x)  # a patch larger than the slide is cropped
        r0 = y - self.y0
        win = self.window[:h, :w]
        self.acc[:, r0:r0 + h, x:x + w] += prob[:, :h, :w] * win
        self.wsum[r0:r0 + h, x:x + w] += win

    def flush(self, upto: int) -> None:
        """Finalise rows [y0, upto) and move the buffer down."""
        upto = min(upto, self.height)
        n = upto - self.y0
        if n <= 0:
            return
        while n > 0:
            k = min(n, self.patch)
            wsum = self.wsum[:k]
            covered = wsum > 0
            prob = (self.acc[:, :k] / np.where(covered, wsum, np.float32(1.0))).astype(np.float32, copy=False)
            labels = self.decide(prob)
            labels[~covered] = self.background
            if self.tissue is not None:
                tm, tscale = self.tissue
                trows = np.minimum(((np.arange(self.y0, self.y0 + k) + 0.5) / tscale).astype(np.int64),
                                   tm.shape[0] - 1)
                labels[~tm[trows][:, self._tcols]] = self.background
            self.cmap[self.y0:self.y0 + k] = labels
            if self.probs is not None:
                q = np.clip(prob * 255.0 + 0.5, 0, 255).astype(np.uint8).transpose(1, 2, 0)
                q[~covered] = 0
                self.probs[self.y0:self.y0 + k] = q
            # shift the buffer up by k rows
            self.acc[:, :-k] = self.acc[:, k:].copy() if k < self.patch else 0
            self.acc[:, self.patch - k:] = 0
            self.wsum[:-k] = self.wsum[k:].copy() if k < self.patch else 0
            self.wsum[self.patch - k:] = 0
            self.y0 += k
            n -= k
            self.signal.advance(self.y0)


def class_decider(cfg: InferenceConfig, channel_classes: Sequence[int]) -> Callable[[npt.NDArray[np.float32]],
                                                                               npt.NDArray[np.uint8]]:
    """The map from blended probabilities (channels × h × w) to class indices: the top channel's class; for
    sigmoid or one-channel outputs, background where the top probability is under ``threshold``."""
    lut = np.asarray(channel_classes, np.uint8)
    bg = np.uint8(cfg.background_index)
    thr = np.float32(cfg.threshold)
    if cfg.activation == "sigmoid" or len(channel_classes) == 1:
        def decide(prob: npt.NDArray[np.float32]) -> npt.NDArray[np.uint8]:
            best = prob.argmax(axis=0)
            top = np.take_along_axis(prob, best[None], axis=0)[0]
            return np.where(top >= thr, lut[best], bg).astype(np.uint8)
    else:
        def decide(prob: npt.NDArray[np.float32]) -> npt.NDArray[np.uint8]:
            return np.asarray(lut[prob.argmax(axis=0)], dtype=np.uint8)
    return decide


def alloc_map(shape: tuple[int, ...], tmpdir: Path) -> npt.NDArray[np.uint8]:
    """A zeroed uint8 map of ``shape``: in memory, or a ``.npy`` memmap in ``tmpdir`` above ``MEMMAP_BYTES``."""
    if math.prod(shape) <= MEMMAP_BYTES:
        return np.zeros(shape, np.uint8)
    return np.lib.format.open_memmap(tmpdir / f"map{len(list(tmpdir.iterdir()))}.npy", mode="w+",
                                     dtype=np.uint8, shape=shape)
