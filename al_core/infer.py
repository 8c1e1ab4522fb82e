"""Whole-slide inference with ONNX Runtime into a tiled, compressed, pyramidal TIFF class map.

Pipeline (one slide): tissue mask → the core's patch grid at the model's scale (tissue patches only) →
a reader thread reads and preprocesses batches → the calling thread runs ONNX Runtime → a stitcher thread
turns outputs into probabilities and blends them with a cosine-ramped window into a strip buffer one
patch high, finalising rows (threshold/argmax) into a uint8 class map at model resolution → a writer
thread encodes level 0 of the TIFF while later rows are still being predicted. Memory is bounded by one
patch row of the slide width (the class map itself is a disk-backed memmap above a size limit).

Many slides run as Dask tasks (:func:`infer_many`) on a LocalCluster or a scheduler the user names.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from al_core import __version__
from al_core._io import atomic_path, atomic_write_bytes
from al_core.errors import SlideError, SlideloopError
from al_core.grid import GridSpec, grid_boxes, tissue_fractions
from al_core.model_config import (
    META_PREFIX,
    InferenceConfig,
    ModelConfigError,
    check_against_model,
    load_config,
    read_onnx_metadata,
)
from al_core.slides import Slide, open_slide
from al_core.stain import Preprocessor, get_preprocessor
from al_core.tissue import compute_tissue

log = logging.getLogger(__name__)

#: execution providers in order of preference (the first available ones are used)
PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
#: a model mpp finer than the slide's by more than this factor would need upsampling: refused
MAX_UPSAMPLE = 1.25
#: class maps larger than this many bytes live in a temporary memmap instead of RAM
MEMMAP_BYTES = 256 << 20
#: stage names of the timing table, in FastPathology's Table 2 order
STAGES = ("patch_generation", "input", "inference", "output", "stitching", "tiff_export", "geojson", "total")
COMPRESSIONS = ("deflate", "zstd", "lzw", "none")


class InferenceError(SlideloopError):
    """Inference over a slide failed; the message names the slide or model."""


# --- the model --------------------------------------------------------------------------------------


def select_providers(requested: Sequence[str] | None = None) -> list[str]:
    """ONNX Runtime execution providers: ``requested`` (all must exist) or the best available ones."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if requested:
        missing = [p for p in requested if p not in available]
        if missing:
            raise ValueError(f"execution provider(s) {missing} not available; available: {available}")
        return list(requested)
    return [p for p in PREFERRED_PROVIDERS if p in available] or ["CPUExecutionProvider"]


class OnnxSegmenter:
    """An ONNX Runtime session plus the config that says how to feed it and read its output."""

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        config: InferenceConfig | str | os.PathLike[str] | None = None,
        *,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
    ) -> None:
        import onnxruntime as ort

        p = Path(model_path)
        if p.is_dir() and (p / "model.onnx").is_file():  # a pushed model's folder
            p = p / "model.onnx"
        self.path = p
        props = read_onnx_metadata(p)  # clear error for a missing or non-ONNX file
        if isinstance(config, InferenceConfig):
            self.config = config
        elif config is not None:
            self.config = load_config(config)
        elif any(k.startswith(META_PREFIX) for k in props):
            self.config = InferenceConfig.from_metadata(props, p)
        else:
            raise ModelConfigError(p, "has no slideloop metadata; give its settings with --config "
                                      "(JSON/TOML or a FastPathology model .txt)")
        if self.config.input_size[0] != self.config.input_size[1]:
            raise ModelConfigError(p, f"non-square model input {self.config.input_size} is not supported")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(p), sess_options=opts, providers=select_providers(providers))
        except Exception as err:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
            raise ModelConfigError(p, f"ONNX Runtime cannot load the model ({type(err).__name__}: {err})") from err
        self.input_name, self.output_name = check_against_model(
            self.config, self.session.get_inputs(), self.session.get_outputs(), p)
        self.providers = self.session.get_providers()

    def normalise(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """(N, H, W, 3) float 0–255 → the model's input layout and value range."""
        cfg = self.config
        x = batch[..., ::-1] if cfg.channel_order == "BGR" else batch
        x = (x * np.float32(cfg.scale) - np.asarray(cfg.mean, np.float32)) / np.asarray(cfg.std, np.float32)
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2) if cfg.layout == "NCHW" else x, dtype=np.float32)

    def run(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Raw model output for a normalised batch, as NCHW."""
        out = self.session.run([self.output_name], {self.input_name: x})[0]
        if out.ndim != 4:
            raise InferenceError(f"{self.path}: output has shape {out.shape}, expected 4-D")
        return out if self.config.layout == "NCHW" else out.transpose(0, 3, 1, 2)

    def probabilities(self, raw: npt.NDArray[np.float32], size: tuple[int, int]) -> npt.NDArray[np.float32]:
        """Per-channel probabilities (N, C, h, w) at the input ``size`` (w, h) from a raw NCHW output."""
        act = self.config.activation
        if act == "softmax":
            e = np.exp(raw - raw.max(axis=1, keepdims=True))
            prob = e / e.sum(axis=1, keepdims=True)
        elif act == "sigmoid":
            prob = 1.0 / (1.0 + np.exp(-np.clip(raw, -60, 60)))
        else:
            prob = raw
        w, h = size
        oh, ow = prob.shape[2:]
        if (oh, ow) == (h, w):
            return prob.astype(np.float32, copy=False)
        if oh >= h and ow >= w:  # padded output (e.g. to a multiple of 8): crop the padding
            return np.ascontiguousarray(prob[:, :, :h, :w], dtype=np.float32)
        # a coarser output map: back to input resolution
        return np.stack([np.stack([cv2.resize(c, (w, h), interpolation=cv2.INTER_LINEAR) for c in p])
                         for p in prob]).astype(np.float32)


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


# --- results ----------------------------------------------------------------------------------------


@dataclass
class InferenceResult:
    """What :func:`infer_slide` wrote and how long each stage took (seconds of work per stage; stages run
    concurrently, so they can add up to more than ``total``)."""

    slide: str
    output: str
    report: str
    geojson: str | None
    probabilities: str | None
    dimensions: tuple[int, int]
    model_dimensions: tuple[int, int]
    downsample: float
    mpp: float | None
    model_mpp: float | None
    levels: int
    patches: int
    patches_total: int
    providers: list[str]
    class_pixels: dict[str, int]
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- pipeline pieces ----------------------------------------------------------------------------------


class _RowSignal:
    """Rows [0, done) of the class map are final; waiters are woken as it grows (or on abort)."""

    def __init__(self) -> None:
        self.done = 0
        self.failed = False
        self._cv = threading.Condition()

    def advance(self, rows: int) -> None:
        with self._cv:
            self.done = max(self.done, rows)
            self._cv.notify_all()

    def abort(self) -> None:
        with self._cv:
            self.failed = True
            self._cv.notify_all()

    def wait(self, rows: int) -> float:
        t = time.perf_counter()
        with self._cv:
            while self.done < rows and not self.failed:
                self._cv.wait(0.5)
        if self.failed:
            raise InferenceError("inference failed; output abandoned")
        return time.perf_counter() - t


class _StripBlender:
    """Blends patch probabilities into a buffer one patch high and finalises rows above the current patch
    row into the class map (and optional quantised probabilities)."""

    def __init__(self, n_ch: int, width: int, height: int, patch: int, window: npt.NDArray[np.float32],
                 decide: Callable[[npt.NDArray[np.float32]], npt.NDArray[np.uint8]],
                 cmap: npt.NDArray[np.uint8], probs: npt.NDArray[np.uint8] | None, signal: _RowSignal,
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
            prob = self.acc[:, :k] / np.where(covered, wsum, 1.0)
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


def _decider(cfg: InferenceConfig, channel_classes: Sequence[int]) -> Callable[[npt.NDArray[np.float32]],
                                                                               npt.NDArray[np.uint8]]:
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
            return lut[prob.argmax(axis=0)]
    return decide


def _alloc(shape: tuple[int, ...], tmpdir: Path) -> npt.NDArray[np.uint8]:
    if math.prod(shape) <= MEMMAP_BYTES:
        return np.zeros(shape, np.uint8)
    return np.lib.format.open_memmap(tmpdir / f"map{len(list(tmpdir.iterdir()))}.npy", mode="w+",
                                     dtype=np.uint8, shape=shape)


def pyramid_sizes(width: int, height: int, min_size: int = 512) -> list[tuple[int, int]]:
    """(w, h) of each level: halving until the long side is at most ``min_size``."""
    sizes = [(width, height)]
    while max(sizes[-1]) > min_size:
        w, h = sizes[-1]
        sizes.append((max(1, math.ceil(w / 2)), max(1, math.ceil(h / 2))))
    return sizes


def _tiles(src: npt.NDArray[np.uint8], scale: float, size: tuple[int, int], tile: int,
           signal: _RowSignal | None, waited: list[float]) -> Iterator[npt.NDArray[np.uint8]]:
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
    signal: _RowSignal | None = None,
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


# --- one slide --------------------------------------------------------------------------------------


def model_downsample(cfg: InferenceConfig, slide: Slide) -> float:
    """Level-0 downsample at which the model sees the slide; refuses slides it cannot be read at."""
    model_mpp = cfg.mpp
    if model_mpp is None:
        return cfg.downsample or 1.0
    if slide.mpp is None:
        raise SlideError(slide.path, f"has no microns-per-pixel metadata, and the model needs {model_mpp:g} µm/px; "
                                     "give the slide's with --mpp")
    ds = model_mpp / slide.mpp
    if ds < 1 / MAX_UPSAMPLE:
        raise SlideError(slide.path, f"is scanned at {slide.mpp:g} µm/px but the model needs {model_mpp:g} µm/px "
                                     f"({1 / ds:.2g}x finer than level 0); it cannot be read at the model's scale")
    return ds


def report_path(output: str | os.PathLike[str]) -> Path:
    """``pred.tiff`` → ``pred.report.json`` (the run report beside the output)."""
    out = Path(output)
    return out.with_name(out.stem + ".report.json")


def infer_slide(
    model: OnnxSegmenter | str | os.PathLike[str],
    slide_path: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    config: InferenceConfig | str | os.PathLike[str] | None = None,
    mpp: float | None = None,
    batch_size: int = 4,
    min_tissue: float | None = None,
    overlap: int | None = None,
    probabilities: bool = False,
    geojson: bool = True,
    mask_tissue: bool = True,
    compression: str = "deflate",
    tile: int = 512,
    providers: Sequence[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> InferenceResult:
    """Segment one slide and write ``output`` (pyramidal TIFF class map at the slide's level-0 geometry),
    ``<stem>.report.json`` (report + stage timings), ``<stem>.geojson`` (QuPath polygons, unless ``geojson`` is
    False) and optionally ``<stem>.probabilities.tiff`` (uint8 per-class probabilities at model scale).

    ``min_tissue``/``overlap`` override the config's; ``min_tissue=0`` predicts every patch. With
    ``mask_tissue`` (and ``min_tissue > 0``) pixels outside the tissue mask are background.
    ``progress(done, total)`` is called after each batch.
    """
    t_start = time.perf_counter()
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
    if isinstance(model, OnnxSegmenter) and (config is not None or providers is not None):
        raise ValueError("config/providers belong to the OnnxSegmenter when one is passed as the model")
    seg = model if isinstance(model, OnnxSegmenter) else OnnxSegmenter(model, config, providers=providers)
    cfg = seg.config.with_overrides(min_tissue=min_tissue, overlap=overlap)
    out = Path(output)
    if out.suffix.lower() not in (".tif", ".tiff"):
        raise ValueError(f"{out}: the output must be a .tif/.tiff file")
    timings = dict.fromkeys(STAGES, 0.0)

    # --- patch generation: tissue mask and the grid at model scale
    t = time.perf_counter()
    slide = open_slide(slide_path, mpp=mpp)
    try:
        ds = model_downsample(cfg, slide)
        W, H = slide.dimensions
        mw, mh = max(1, round(W / ds)), max(1, round(H / ds))
        patch = cfg.input_size[0]
        spec = GridSpec(patch=patch, overlap=cfg.overlap, min_tissue=cfg.min_tissue, downsample=1.0)
        boxes = grid_boxes(mw, mh, spec, 1.0)
        tissue = compute_tissue(slide)
        if cfg.min_tissue > 0:
            frac = tissue_fractions(boxes, tissue.mask, tissue.downsample / ds)
            keep = np.flatnonzero(frac >= cfg.min_tissue)
        else:
            keep = np.arange(len(boxes))
        xs, ys = boxes.x[keep], boxes.y[keep]
        timings["patch_generation"] = time.perf_counter() - t

        # --- slide-level preprocessing statistics (stain vectors): counted as input
        t = time.perf_counter()
        pre = get_preprocessor(cfg.preprocess)
        if cfg.preprocess not in ("none", "rgb"):
            fit_ds = max(ds, max(W, H) / 2048)
            fw, fh = max(1, round(W / fit_ds)), max(1, round(H / fit_ds))
            rgb = slide.read((0, 0), (fw, fh), downsample=fit_ds)
            bg = cv2.resize(tissue.mask.astype(np.uint8), (fw, fh), interpolation=cv2.INTER_NEAREST) == 0
            pre.fit(rgb, bg)
        timings["input"] += time.perf_counter() - t
    finally:
        slide.close()

    n_ch = _output_channels(seg, patch)
    try:
        channel_classes = cfg.channel_classes(n_ch)
    except ValueError as err:
        raise ModelConfigError(seg.path, str(err)) from err
    names = {c.index: c for c in cfg.classes}
    meta = {"slideloop": {"kind": "class_map", "classes": [asdict(c) for c in cfg.classes],
                          "model": str(seg.path), "model_name": cfg.model_name, "model_version": cfg.model_version,
                          "model_mpp": cfg.mpp, "downsample": ds, "version": __version__}}

    with tempfile.TemporaryDirectory(prefix="slideloop-infer-") as td:
        cmap = _alloc((mh, mw), Path(td))
        probs = _alloc((mh, mw, n_ch), Path(td)) if probabilities else None
        signal = _RowSignal()
        blender = _StripBlender(n_ch, mw, mh, patch, blend_window(patch, cfg.overlap), _decider(cfg, channel_classes),
                                cmap, probs, signal, cfg.background_index,
                                (tissue.mask, tissue.downsample / ds) if mask_tissue and cfg.min_tissue > 0 else None)
        writer_state: dict[str, Any] = {}

        def write_level0() -> None:
            t0 = time.perf_counter()
            try:
                levels, waited = write_pyramid(out, cmap, ds, (W, H), slide.mpp, compression=compression,
                                               tile=tile, description=json.dumps(meta), signal=signal)
                writer_state["levels"] = levels
                writer_state["busy"] = time.perf_counter() - t0 - waited
            except BaseException as err:  # re-raised in the calling thread
                writer_state["error"] = err
                signal.abort()

        writer = threading.Thread(target=write_level0, name="slideloop-tiff", daemon=True)
        writer.start()
        try:
            _run_patches(seg, pre, Path(slide_path), mpp, ds, patch, xs, ys, batch_size, blender, timings, progress)
            t = time.perf_counter()
            blender.flush(mh)
            timings["stitching"] += time.perf_counter() - t
        except BaseException:
            signal.abort()
            writer.join()
            raise
        # the class map is final: GeoJSON runs beside the TIFF's remaining levels (ORT no longer needs the cores)
        gj_path = out.with_suffix(".geojson") if geojson else None
        gj_state: dict[str, Any] = {}

        def write_gj() -> None:
            t0 = time.perf_counter()
            try:
                write_geojson(gj_path, np.asarray(cmap), ds, cfg)  # type: ignore[arg-type]
            except BaseException as err:  # re-raised in the calling thread
                gj_state["error"] = err
            gj_state["time"] = time.perf_counter() - t0

        gj_thread = threading.Thread(target=write_gj, name="slideloop-geojson", daemon=True) if geojson else None
        if gj_thread is not None:
            gj_thread.start()
        writer.join()
        counts = np.bincount(np.asarray(cmap).ravel(), minlength=256)
        class_pixels = {names[i].name if i in names else str(i): int(counts[i]) for i in np.flatnonzero(counts)}
        prob_path = None
        if probs is not None and "error" not in writer_state:
            t = time.perf_counter()
            prob_path = out.with_name(out.stem + ".probabilities.tiff")
            pmeta = {"slideloop": {**meta["slideloop"], "kind": "probabilities",
                                   "channels": [names[i].name for i in channel_classes]}}
            write_pyramid(prob_path, probs, 1.0, (mw, mh), None if slide.mpp is None else slide.mpp * ds,
                          compression=compression, tile=tile, description=json.dumps(pmeta))
            timings["tiff_export"] += time.perf_counter() - t
        if gj_thread is not None:
            gj_thread.join()
            timings["geojson"] = gj_state["time"]
        if "error" in writer_state:
            err = writer_state["error"]
            raise InferenceError(f"{out}: cannot write the TIFF ({err})") from err
        if "error" in gj_state:
            err = gj_state["error"]
            raise InferenceError(f"{gj_path}: cannot write the GeoJSON ({err})") from err
        timings["tiff_export"] += writer_state["busy"]

    timings["total"] = time.perf_counter() - t_start
    rep = report_path(out)
    result = InferenceResult(
        slide=str(slide_path), output=str(out), report=str(rep), geojson=None if gj_path is None else str(gj_path),
        probabilities=None if prob_path is None else str(prob_path), dimensions=(W, H), model_dimensions=(mw, mh),
        downsample=ds, mpp=slide.mpp, model_mpp=None if slide.mpp is None else slide.mpp * ds,
        levels=int(writer_state["levels"]), patches=len(xs), patches_total=len(boxes),
        providers=list(seg.providers), class_pixels=class_pixels,
        timings={k: round(v, 4) for k, v in timings.items()},
    )
    atomic_write_bytes(rep, json.dumps({**result.to_dict(), "config": cfg.to_dict()}, indent=2).encode())
    return result


def _output_channels(seg: OnnxSegmenter, patch: int) -> int:
    out = next(o for o in seg.session.get_outputs() if o.name == seg.output_name)
    c = out.shape[1 if seg.config.layout == "NCHW" else 3]
    if isinstance(c, int) and c > 0:
        return c
    # dynamic channel count: ask the model once
    x = seg.normalise(np.full((1, patch, patch, 3), 255.0, np.float32))
    return int(seg.run(x).shape[1])


def _run_patches(seg: OnnxSegmenter, pre: Preprocessor, slide_path: Path, mpp: float | None, ds: float, patch: int,
                 xs: npt.NDArray[np.int64], ys: npt.NDArray[np.int64], batch_size: int, blender: _StripBlender,
                 timings: dict[str, float], progress: Callable[[int, int], None] | None) -> None:
    """Reader thread → ORT in this thread → stitcher thread, with bounded queues between them."""
    n = len(xs)
    q_in: queue.Queue[Any] = queue.Queue(maxsize=3)
    q_out: queue.Queue[Any] = queue.Queue(maxsize=3)
    stop = threading.Event()
    errors: list[BaseException] = []
    lock = threading.Lock()

    def put(q: queue.Queue[Any], item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def reader() -> None:
        try:
            with open_slide(slide_path, mpp=mpp) as slide:  # a Slide per thread: tiffslide is not thread-safe
                for i in range(0, n, batch_size):
                    t = time.perf_counter()
                    bx, by = xs[i:i + batch_size], ys[i:i + batch_size]
                    rgb = np.stack([slide.read((round(x * ds), round(y * ds)), (patch, patch), downsample=ds)
                                    for x, y in zip(bx, by, strict=True)])
                    x_in = seg.normalise(pre(rgb))
                    with lock:
                        timings["input"] += time.perf_counter() - t
                    if not put(q_in, (bx, by, x_in)):
                        return
        except BaseException as err:
            errors.append(err)
            stop.set()
        finally:
            put(q_in, None)

    def stitcher() -> None:
        try:
            while True:
                item = q_out.get()
                if item is None:
                    return
                bx, by, raw = item
                t = time.perf_counter()
                prob = seg.probabilities(raw, (patch, patch))
                t1 = time.perf_counter()
                for x, y, p in zip(bx, by, prob, strict=True):
                    blender.add(int(x), int(y), p)
                t2 = time.perf_counter()
                with lock:
                    timings["output"] += t1 - t
                    timings["stitching"] += t2 - t1
        except BaseException as err:
            errors.append(err)
            stop.set()
            while q_out.get() is not None:  # drain so the producer is not blocked
                pass

    threads = [threading.Thread(target=reader, name="slideloop-read", daemon=True),
               threading.Thread(target=stitcher, name="slideloop-stitch", daemon=True)]
    for th in threads:
        th.start()
    done = 0
    try:
        while True:
            try:
                item = q_in.get(timeout=0.2)
            except queue.Empty:
                if stop.is_set():
                    break
                continue
            if item is None or stop.is_set():
                break
            bx, by, x_in = item
            t = time.perf_counter()
            raw = seg.run(x_in)
            timings["inference"] += time.perf_counter() - t
            q_out.put((bx, by, raw))
            done += len(bx)
            if progress is not None:
                progress(done, n)
    except BaseException as err:
        errors.append(err)
        stop.set()
    finally:
        q_out.put(None)
        if stop.is_set():  # unblock a reader still waiting to put a batch
            _drain(q_in)
        for th in threads:
            th.join()
    if errors:
        err = errors[0]
        if isinstance(err, SlideloopError | ValueError):
            raise err
        raise InferenceError(f"{slide_path}: inference failed ({type(err).__name__}: {err})") from err


def _drain(q: queue.Queue[Any]) -> None:
    try:
        while True:
            q.get_nowait()
    except queue.Empty:
        pass


def write_geojson(path: str | os.PathLike[str], cmap: npt.NDArray[np.uint8], ds: float, cfg: InferenceConfig,
                  max_side: int = 8192, min_pixels: int = 16) -> int:
    """QuPath GeoJSON polygons (level-0 coordinates) of each non-background class, simplified to about
    one model pixel. Regions and holes under ``min_pixels`` model pixels are dropped first (speckle makes
    huge, slow polygons and is no annotation); class maps larger than ``max_side`` are coarsened.
    Returns the feature count."""
    import shapely
    from shapely.geometry import MultiPolygon
    from skimage.morphology import remove_small_holes, remove_small_objects

    from al_core.labels import mask_to_shapes, to_geojson

    step = max(1, math.ceil(max(cmap.shape) / max_side))
    small = np.array(cmap[::step, ::step] if step > 1 else cmap, dtype=np.uint8)
    bg = cfg.background_index
    limit = max(1, min_pixels // (step * step))
    for idx in np.unique(small):
        if idx == bg:
            continue
        m = small == idx
        keep = remove_small_holes(remove_small_objects(m, max_size=limit), max_size=limit)
        small[m & ~keep] = bg
        small[keep & ~m & (small == bg)] = idx  # filled holes that were background
    scale = ds * step
    by_idx = {c.index: c for c in cfg.classes}
    shapes = []
    for idx, geom in mask_to_shapes(small, scale=scale, background=bg):
        # simplify each connected part on its own: one topology-preserving pass over a MultiPolygon of
        # many parts is quadratic
        parts = shapely.simplify(shapely.get_parts(geom), scale, preserve_topology=True)
        parts = [g for g in parts if not g.is_empty]
        if not parts:
            continue
        c = by_idx.get(idx)
        shapes.append((MultiPolygon(parts) if len(parts) > 1 else parts[0], c.name if c else f"Class {idx}",
                       c.color if c else "#808080"))
    atomic_write_bytes(path, json.dumps(to_geojson(shapes)).encode())
    return len(shapes)


# --- many slides -------------------------------------------------------------------------------------


def _infer_task(model: str, slide: str, output: str, config: dict[str, Any] | None, kwargs: dict[str, Any]) -> dict[str, Any]:
    cfg = InferenceConfig.from_dict(config) if config is not None else None
    return infer_slide(model, slide, output, config=cfg, **kwargs).to_dict()


def infer_many(
    model: str | os.PathLike[str],
    slides: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    config: InferenceConfig | str | os.PathLike[str] | None = None,
    scheduler: str | None = None,
    n_workers: int = 1,
    progress: Callable[[dict[str, Any]], None] | None = None,
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """Run :func:`infer_slide` for each slide as a Dask task; outputs go to ``out_dir/<slide stem>.tiff``.

    ``scheduler`` is a ``dask.distributed`` address (``tcp://host:8786``); without it a LocalCluster with
    ``n_workers`` single-threaded worker processes is started (one is right for one machine: ONNX Runtime
    already uses every core). The model and slides must be readable at the same paths on the workers.
    A slide that fails gives an ``{"slide", "error"}`` entry; the others go on. Results are in input order.
    """
    from dask.distributed import Client, LocalCluster, as_completed

    out = Path(out_dir)
    if out.suffix:
        raise ValueError(f"{out}: with several slides (or a scheduler) the output is a folder, not a file")
    # fail early, in the client, on a bad model/config rather than once per slide on the cluster
    seg = OnnxSegmenter(model, config, providers=kwargs.get("providers"))
    cfg_dict = seg.config.to_dict()
    del seg
    stems = [Path(s).stem for s in slides]
    dupes = sorted({s for s in stems if stems.count(s) > 1})
    if dupes:
        raise ValueError(f"slides with the same name would write the same output: {', '.join(dupes)}")
    missing = [str(s) for s in slides if not Path(s).is_file()]
    if missing:
        raise SlideError(missing[0], "file not found")
    out.mkdir(parents=True, exist_ok=True)
    model_abs = str(Path(model).resolve())
    if scheduler:
        client = Client(scheduler)
        cluster = None
    else:
        cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=None)
        client = Client(cluster)
    try:
        futures = {}
        for s, stem in zip(slides, stems, strict=True):
            f = client.submit(_infer_task, model_abs, str(Path(s).resolve()), str((out / f"{stem}.tiff").resolve()),
                              cfg_dict, kwargs, pure=False, key=f"infer-{stem}-{os.getpid()}-{time.time_ns()}")
            futures[f] = str(s)
        results: dict[str, dict[str, Any]] = {}
        for f in as_completed(list(futures)):
            s = futures[f]
            try:
                res = f.result()
            except (SlideloopError, ValueError, OSError) as err:
                res = {"slide": s, "error": str(err)}
            results[s] = res
            if progress is not None:
                progress(res)
        return [results[str(s)] for s in slides]
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
