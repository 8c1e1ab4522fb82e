"""The inference pipeline of one slide: a reader thread, ONNX Runtime in the calling thread, a stitcher thread.

Bounded queues between the three keep memory to a few batches; the first error anywhere stops all three and
is raised in the calling thread.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from al_core.deploy.read_runs import read_patches
from al_core.deploy.segmenter import OnnxSegmenter
from al_core.deploy.stitch import StripBlender
from al_core.errors import InferenceError, SlideloopError
from al_core.wsi.slides import open_slide
from al_core.wsi.stain import Preprocessor

#: batches waiting between two stages
QUEUE_DEPTH = 3


@dataclass
class _Pipeline:
    seg: OnnxSegmenter
    pre: Preprocessor
    slide_path: Path
    mpp: float | None
    ds: float
    patch: int
    xs: npt.NDArray[np.int64]
    ys: npt.NDArray[np.int64]
    batch_size: int
    blender: StripBlender
    timings: dict[str, float]
    q_in: queue.Queue[Any] = field(default_factory=lambda: queue.Queue(maxsize=QUEUE_DEPTH))
    q_out: queue.Queue[Any] = field(default_factory=lambda: queue.Queue(maxsize=QUEUE_DEPTH))
    stop: threading.Event = field(default_factory=threading.Event)
    errors: list[BaseException] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def fail(self, err: BaseException) -> None:
        self.errors.append(err)
        self.stop.set()

    def add_time(self, stage: str, seconds: float) -> None:
        with self.lock:
            self.timings[stage] += seconds

    def put(self, q: queue.Queue[Any], item: Any) -> bool:
        """Put unless the pipeline stopped meanwhile (then False)."""
        while not self.stop.is_set():
            try:
                q.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def read(self) -> None:
        """Reader thread: read (a row's run of patches at a time) and preprocess batches of patches (its own
        Slide: tiffslide is not thread-safe)."""
        try:
            with open_slide(self.slide_path, mpp=self.mpp) as slide:
                t = time.perf_counter()
                for part, rgb in read_patches(slide, self.xs, self.ys, self.ds, self.patch, self.batch_size):
                    x_in = self.seg.normalise(self.pre(rgb))
                    self.add_time("input", time.perf_counter() - t)
                    if not self.put(self.q_in, (self.xs[part], self.ys[part], x_in)):
                        return
                    t = time.perf_counter()
        except BaseException as err:
            self.fail(err)
        finally:
            self.put(self.q_in, None)

    def stitch(self) -> None:
        """Stitcher thread: probabilities from raw outputs, blended into the strip buffer."""
        try:
            while (item := self.q_out.get()) is not None:
                bx, by, raw = item
                t = time.perf_counter()
                prob = self.seg.probabilities(raw, (self.patch, self.patch))
                t1 = time.perf_counter()
                for x, y, p in zip(bx, by, prob, strict=True):
                    self.blender.add(int(x), int(y), p)
                self.add_time("output", t1 - t)
                self.add_time("stitching", time.perf_counter() - t1)
        except BaseException as err:
            self.fail(err)
            while self.q_out.get() is not None:  # drain so the producer is not blocked
                pass

    def infer(self, progress: Callable[[int, int], None] | None) -> None:
        """This thread: ONNX Runtime on each batch the reader hands over."""
        done = 0
        try:
            while True:
                try:
                    item = self.q_in.get(timeout=0.2)
                except queue.Empty:
                    if self.stop.is_set():
                        break
                    continue
                if item is None or self.stop.is_set():
                    break
                bx, by, x_in = item
                t = time.perf_counter()
                raw = self.seg.run(x_in)
                self.add_time("inference", time.perf_counter() - t)
                self.q_out.put((bx, by, raw))
                done += len(bx)
                if progress is not None:
                    progress(done, len(self.xs))
        except BaseException as err:
            self.fail(err)
        finally:
            self.q_out.put(None)
            if self.stop.is_set():  # unblock a reader still waiting to put a batch
                _drain(self.q_in)


def run_patches(seg: OnnxSegmenter, pre: Preprocessor, slide_path: Path, mpp: float | None, ds: float, patch: int,
                xs: npt.NDArray[np.int64], ys: npt.NDArray[np.int64], batch_size: int, blender: StripBlender,
                timings: dict[str, float], progress: Callable[[int, int], None] | None) -> None:
    """Predict the patches at model-pixel corners ``xs, ys`` (read ``ds`` times down from level 0) into
    ``blender``; ``timings`` gains the input, inference, output and stitching seconds."""
    pipe = _Pipeline(seg, pre, slide_path, mpp, ds, patch, xs, ys, batch_size, blender, timings)
    threads = [threading.Thread(target=pipe.read, name="slideloop-read", daemon=True),
               threading.Thread(target=pipe.stitch, name="slideloop-stitch", daemon=True)]
    for th in threads:
        th.start()
    try:
        pipe.infer(progress)
    finally:
        for th in threads:
            th.join()
    if pipe.errors:
        first = pipe.errors[0]
        if isinstance(first, SlideloopError | ValueError):
            raise first
        raise InferenceError(f"{slide_path}: inference failed ({type(first).__name__}: {first})") from first


def _drain(q: queue.Queue[Any]) -> None:
    try:
        while True:
            q.get_nowait()
    except queue.Empty:
        pass
