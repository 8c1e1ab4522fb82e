"""Whole-slide inference with ONNX Runtime into a tiled, compressed, pyramidal TIFF class map.

One slide: tissue mask -> the patch grid at the model's scale (tissue patches only) -> read + preprocess,
ONNX Runtime, blend (:mod:`al_core.deploy.pipeline`) -> class map written while later rows are still being
predicted (:mod:`al_core.deploy.tiff_writer`) -> GeoJSON polygons and a report with the stage timings.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from al_core import __version__
from al_core._guards import check_free_space, check_output
from al_core._io import atomic_write_bytes
from al_core.deploy.config import InferenceConfig
from al_core.deploy.pipeline import run_patches
from al_core.deploy.plan import SlidePlan, plan_slide
from al_core.deploy.segmenter import OnnxSegmenter
from al_core.deploy.stitch import (
    MEMMAP_BYTES,
    RowSignal,
    StripBlender,
    alloc_map,
    blend_window,
    class_decider,
)
from al_core.deploy.tiff_writer import COMPRESSIONS, write_pyramid
from al_core.deploy.vectorise import write_geojson
from al_core.errors import InferenceError, ModelConfigError, SlideloopError

log = logging.getLogger(__name__)


#: stage names of the timing table, in FastPathology's Table 2 order
STAGES = ("patch_generation", "input", "inference", "output", "stitching", "tiff_export", "geojson", "total")


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
    #: the scale the model was trained at: ``mpp``, or ``downsample`` with ``calibrated`` false (see
    #: :func:`model_scale`); ``model_mpp`` is the µm/px the slide was read at (equal when calibrated)
    model_scale: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The result as a plain dict (the per-slide entry of the CLI's JSON output)."""
        return asdict(self)


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
    out = Path(output)
    if out.suffix.lower() not in (".tif", ".tiff"):
        raise ValueError(f"{out}: the output must be a .tif/.tiff file")
    for side in _output_paths(out, geojson, probabilities):
        check_output(side, what="inference output")
    seg = model if isinstance(model, OnnxSegmenter) else OnnxSegmenter(model, config, providers=providers)
    cfg = seg.config.with_overrides(min_tissue=min_tissue, overlap=overlap)
    timings = dict.fromkeys(STAGES, 0.0)
    t = time.perf_counter()
    plan = plan_slide(cfg, slide_path, mpp)
    timings["patch_generation"] = time.perf_counter() - t
    n_ch = _output_channels(seg, plan.patch)
    try:
        channel_classes = cfg.channel_classes(n_ch)
    except ValueError as err:
        raise ModelConfigError(seg.path, str(err)) from err
    _check_room(out, plan, len(channel_classes), probabilities, compression)
    meta = {"kind": "class_map", "classes": [asdict(c) for c in cfg.classes], "model": seg.path.name,
            "model_name": cfg.model_name, "model_version": cfg.model_version, "model_mpp": cfg.mpp,
            "model_scale": model_scale(cfg),
            "downsample": plan.downsample, "version": __version__}
    opts = _Outputs(out, geojson, probabilities, compression, tile, mask_tissue and cfg.min_tissue > 0)
    with tempfile.TemporaryDirectory(prefix="slideloop-infer-") as td:
        written = _predict_and_write(seg, cfg, plan, channel_classes, Path(slide_path), mpp, batch_size, opts,
                                     meta, Path(td), timings, progress)
    timings["total"] = time.perf_counter() - t_start
    rep = report_path(out)
    mw, mh = plan.map_size
    result = InferenceResult(
        slide=str(slide_path), output=str(out), report=str(rep), geojson=written.geojson,
        probabilities=written.probabilities, dimensions=plan.dimensions, model_dimensions=(mw, mh),
        downsample=plan.downsample, mpp=plan.mpp, model_mpp=None if plan.mpp is None else plan.mpp * plan.downsample,
        levels=written.levels, patches=len(plan.xs), patches_total=plan.patches_total,
        providers=list(seg.providers), class_pixels=written.class_pixels,
        timings={k: round(v, 4) for k, v in timings.items()}, model_scale=model_scale(cfg),
    )
    atomic_write_bytes(rep, json.dumps({**result.to_dict(), "config": cfg.to_dict()}, indent=2).encode())
    return result


def model_scale(cfg: InferenceConfig) -> dict[str, Any]:
    """The model's own scale as reports give it: ``{"mpp", "downsample", "calibrated"}`` (µm/px unknown:
    ``calibrated`` false; a model with neither runs at level 0, downsample 1)."""
    if cfg.mpp is not None:
        return {"mpp": cfg.mpp, "downsample": None, "calibrated": True}
    return {"mpp": None, "downsample": cfg.downsample or 1.0, "calibrated": False}


@dataclass(frozen=True)
class _Outputs:
    """What to write besides the class map, and how."""

    path: Path
    geojson: bool
    probabilities: bool
    compression: str
    tile: int
    mask_tissue: bool


@dataclass(frozen=True)
class _Written:
    levels: int
    geojson: str | None
    probabilities: str | None
    class_pixels: dict[str, int]


def _predict_and_write(seg: OnnxSegmenter, cfg: InferenceConfig, plan: SlidePlan, channel_classes: Sequence[int],
                       slide_path: Path, mpp: float | None, batch_size: int, opts: _Outputs, meta: dict[str, Any],
                       tmp: Path, timings: dict[str, float],
                       progress: Callable[[int, int], None] | None) -> _Written:
    """Predict every planned patch while the TIFF's level 0 is written behind the finished rows; then the
    GeoJSON beside the TIFF's remaining levels (ONNX Runtime no longer needs the cores)."""
    mw, mh = plan.map_size
    n_ch = len(channel_classes)
    cmap = alloc_map((mh, mw), tmp)
    probs = alloc_map((mh, mw, n_ch), tmp) if opts.probabilities else None
    signal = RowSignal()
    tissue = (plan.tissue.mask, plan.tissue.downsample / plan.downsample) if opts.mask_tissue else None
    blender = StripBlender(n_ch, mw, mh, plan.patch, blend_window(plan.patch, cfg.overlap),
                           class_decider(cfg, channel_classes), cmap, probs, signal, cfg.background_index, tissue)

    def write_map() -> tuple[int, float]:
        t0 = time.perf_counter()
        try:
            levels, waited = write_pyramid(opts.path, cmap, plan.downsample, plan.dimensions, plan.mpp,
                                           compression=opts.compression, tile=opts.tile,
                                           description=json.dumps({"slideloop": meta}), signal=signal)
        except BaseException:
            signal.abort()  # the predicting side stops instead of waiting for a writer that is gone
            raise
        return levels, time.perf_counter() - t0 - waited

    gj_path = opts.path.with_suffix(".geojson") if opts.geojson else None
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="slideloop-out") as pool:
        tiff_job = pool.submit(write_map)
        try:
            run_patches(seg, plan.preprocessor, slide_path, mpp, plan.downsample, plan.patch, plan.xs, plan.ys,
                        batch_size, blender, timings, progress)
            t = time.perf_counter()
            blender.flush(mh)
            timings["stitching"] += time.perf_counter() - t
        except BaseException:
            signal.abort()
            raise
        gj_job = pool.submit(_timed, write_geojson, gj_path, np.asarray(cmap), plan.downsample, cfg) if gj_path else None
        levels, busy = _result_of(tiff_job, f"{opts.path}: cannot write the TIFF")
        timings["tiff_export"] += busy
        prob_path = None
        if probs is not None:
            t = time.perf_counter()
            prob_path = _write_probabilities(opts, probs, plan, meta, cfg, channel_classes)
            timings["tiff_export"] += time.perf_counter() - t
        if gj_job is not None:
            timings["geojson"] = _result_of(gj_job, f"{gj_path}: cannot write the GeoJSON")[1]
    names = {c.index: c.name for c in cfg.classes}
    counts = np.bincount(np.asarray(cmap).ravel(), minlength=256)
    class_pixels = {names.get(int(i), str(i)): int(counts[i]) for i in np.flatnonzero(counts)}
    return _Written(levels, None if gj_path is None else str(gj_path), None if prob_path is None else str(prob_path),
                    class_pixels)


def _write_probabilities(opts: _Outputs, probs: npt.NDArray[np.uint8], plan: SlidePlan, meta: dict[str, Any],
                         cfg: InferenceConfig, channel_classes: Sequence[int]) -> str:
    names = {c.index: c.name for c in cfg.classes}
    path = opts.path.with_name(opts.path.stem + ".probabilities.tiff")
    pmeta = {**meta, "kind": "probabilities", "channels": [names[i] for i in channel_classes]}
    write_pyramid(path, probs, 1.0, plan.map_size, None if plan.mpp is None else plan.mpp * plan.downsample,
                  compression=opts.compression, tile=opts.tile, description=json.dumps({"slideloop": pmeta}))
    return str(path)


def _output_paths(out: Path, geojson: bool, probabilities: bool) -> list[Path]:
    """Every file :func:`infer_slide` writes for ``out``."""
    paths = [out, report_path(out)]
    if geojson:
        paths.append(out.with_suffix(".geojson"))
    if probabilities:
        paths.append(out.with_name(out.stem + ".probabilities.tiff"))
    return paths


def _check_room(out: Path, plan: SlidePlan, n_ch: int, probabilities: bool, compression: str) -> None:
    """Refuse a slide whose working maps (temporary folder) or outputs cannot fit on their disks.

    The maps at model scale are exact; the class-map TIFF is at level-0 geometry, uncompressed with
    ``compression="none"`` and taken as an eighth of that when compressed (class maps compress far better).
    """
    mw, mh = plan.map_size
    maps = mw * mh * (1 + (n_ch if probabilities else 0))
    if maps > MEMMAP_BYTES:
        check_free_space(tempfile.gettempdir(), maps, f"the working maps of {plan.dimensions[0]}x"
                                                      f"{plan.dimensions[1]} px at model scale")
    w, h = plan.dimensions
    tiff = w * h * 4 / 3 / (1 if compression == "none" else 8)
    probs = mw * mh * n_ch * 4 / 3 if probabilities else 0
    check_free_space(out.parent, tiff + probs, "the inference output")


def _timed(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    return fn(*args), time.perf_counter() - t0


def _result_of(job: Future[Any], what: str) -> Any:
    try:
        return job.result()
    except SlideloopError:
        raise
    except Exception as err:  # an I/O or codec failure of a background writer: name the file
        raise InferenceError(f"{what} ({err})") from err


def _output_channels(seg: OnnxSegmenter, patch: int) -> int:
    out = next(o for o in seg.session.get_outputs() if o.name == seg.output_name)
    c = out.shape[1 if seg.config.layout == "NCHW" else 3]
    if isinstance(c, int) and c > 0:
        return c
    # dynamic channel count: ask the model once
    x = seg.normalise(np.full((1, patch, patch, 3), 255.0, np.float32))
    return int(seg.run(x).shape[1])


def infer(model: OnnxSegmenter | str | os.PathLike[str], slide: str | os.PathLike[str],
          output: str | os.PathLike[str], **kwargs: Any) -> InferenceResult:
    """Segment one slide with an ONNX model (a file, a deployed model's folder or an :class:`OnnxSegmenter`);
    the scripting name of :func:`infer_slide`, which documents the keywords."""
    return infer_slide(model, slide, output, **kwargs)
