"""What inference will do on one slide, decided before any patch is predicted: the scale the model reads it at,
the class map's size, the tissue patches of the grid at that scale, and the fitted preprocessing step."""

from __future__ import annotations

import os
from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt

from al_core.deploy.config import InferenceConfig
from al_core.errors import ScaleError
from al_core.wsi.grid import GridSpec, grid_boxes, tissue_fractions
from al_core.wsi.slides import Slide, open_slide
from al_core.wsi.stain import Preprocessor, get_preprocessor
from al_core.wsi.tissue import TissueMask, compute_tissue

#: a model mpp finer than the slide's by more than this factor would need upsampling: refused
MAX_UPSAMPLE = 1.25
#: preprocessing statistics (stain vectors) are fitted on the slide at most this many pixels on its long side
FIT_SIZE = 2048


@dataclass(frozen=True)
class SlidePlan:
    """One slide's inference plan: ``downsample`` from level 0 to model pixels, the class map's size, the
    top-left corners (model pixels) of the patches to predict, the tissue mask and the preprocessing step."""

    dimensions: tuple[int, int]
    mpp: float | None
    downsample: float
    map_size: tuple[int, int]
    patch: int
    xs: npt.NDArray[np.int64]
    ys: npt.NDArray[np.int64]
    patches_total: int
    tissue: TissueMask
    preprocessor: Preprocessor


def model_downsample(cfg: InferenceConfig, slide: Slide) -> float:
    """Level-0 downsample at which the model sees the slide; refuses slides it cannot be read at."""
    model_mpp = cfg.mpp
    if model_mpp is None:
        return cfg.downsample or 1.0
    if slide.mpp is None:
        raise ScaleError(slide.path, f"has no microns-per-pixel metadata, and the model needs {model_mpp:g} µm/px; "
                                     "give the slide's scale")
    ds = model_mpp / slide.mpp
    if ds < 1 / MAX_UPSAMPLE:
        raise ScaleError(slide.path, f"is scanned at {slide.mpp:g} µm/px but the model needs {model_mpp:g} µm/px "
                                     f"({1 / ds:.2g}x finer than level 0); it cannot be read at the model's scale")
    return ds


def plan_slide(cfg: InferenceConfig, slide_path: str | os.PathLike[str], mpp: float | None = None) -> SlidePlan:
    """Open the slide once: its scale, tissue, the grid at model scale (tissue patches only) and the fitted
    preprocessing step (``min_tissue == 0`` keeps every patch)."""
    with open_slide(slide_path, mpp=mpp) as slide:
        ds = model_downsample(cfg, slide)
        W, H = slide.dimensions
        mw, mh = max(1, round(W / ds)), max(1, round(H / ds))
        patch = cfg.input_size[0]
        boxes = grid_boxes(mw, mh, GridSpec(patch=patch, overlap=cfg.overlap, min_tissue=cfg.min_tissue,
                                            downsample=1.0), 1.0)
        tissue = compute_tissue(slide)
        if cfg.min_tissue > 0:
            keep = np.flatnonzero(tissue_fractions(boxes, tissue.mask, tissue.downsample / ds) >= cfg.min_tissue)
        else:
            keep = np.arange(len(boxes))
        pre = fitted_preprocessor(cfg, slide, tissue, ds)
        return SlidePlan((W, H), slide.mpp, ds, (mw, mh), patch, boxes.x[keep], boxes.y[keep], len(boxes), tissue,
                         pre)


def fitted_preprocessor(cfg: InferenceConfig, slide: Slide, tissue: TissueMask, ds: float) -> Preprocessor:
    """The config's preprocessing step, fitted on the whole slide (stain vectors need the slide, not a patch)."""
    pre = get_preprocessor(cfg.preprocess)
    if cfg.preprocess not in ("none", "rgb"):
        W, H = slide.dimensions
        fit_ds = max(ds, max(W, H) / FIT_SIZE)
        fw, fh = max(1, round(W / fit_ds)), max(1, round(H / fit_ds))
        rgb = slide.read((0, 0), (fw, fh), downsample=fit_ds)
        bg = cv2.resize(tissue.mask.astype(np.uint8), (fw, fh), interpolation=cv2.INTER_NEAREST) == 0
        pre.fit(rgb, bg)
    return pre
