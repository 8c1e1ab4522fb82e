"""Tissue detection on a low-resolution image of the slide (saturation + Otsu + morphology), with an optical
density fallback (scikit-image's HED colour deconvolution) for IHC and faint fragments."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt
from skimage.color import rgb2hed
from skimage.filters import threshold_otsu
from skimage.morphology import closing, disk, opening, remove_small_holes, remove_small_objects

from al_core.wsi.slides import Slide

BoolArray = npt.NDArray[np.bool_]

#: the tissue mask is computed at about this many µm per pixel (or this downsample without mpp)
TISSUE_MPP = 8.0
TISSUE_DOWNSAMPLE = 16.0
#: and at most this many pixels on its long side
TISSUE_MAX_SIZE = 4096
#: below this share of saturated tissue the slide is treated as weakly stained (IHC, faint fragments) and its
#: stain optical density decides instead: DAB + hematoxylin on IHC are dark but barely saturated
FAINT_FRACTION = 0.02
#: stain optical density (sum of H, E, DAB; skimage's scale) that glass never reaches above its own level
OD_FLOOR = 0.012


@dataclass(frozen=True)
class TissueMask:
    """A boolean tissue mask and the level-0 downsample of its pixels."""

    mask: BoolArray
    downsample: float

    @property
    def fraction(self) -> float:
        """The share of the mask that is tissue (0–1; 0 for an empty mask)."""
        return float(self.mask.mean()) if self.mask.size else 0.0


def tissue_mask_from_rgb(rgb: npt.NDArray[np.uint8], pixel_um: float | None = None) -> BoolArray:
    """Tissue (True) vs glass/background in an RGB image.

    H&E tissue is coloured and glass is grey-white, so the HSV saturation separates them; Otsu picks the
    split per slide (stain intensity varies). Dark pen marks and black borders are saturated-or-dark and not
    tissue: pixels darker than 15 % value are dropped. Morphology removes dust and fills small lumina.
    ``pixel_um`` (µm per pixel of ``rgb``) scales the morphology; without it 8 µm is assumed.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.size == 0:
        raise ValueError(f"expected an RGB image, got shape {rgb.shape}")
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    sat = cv2.GaussianBlur(hsv[..., 1], (0, 0), 1.0)
    if int(sat.max()) - int(sat.min()) < 8 and _flat(rgb):  # all glass or all tissue: Otsu would split noise
        return np.full(sat.shape, bool(sat.mean() > 40), dtype=bool)
    # glass is never strongly coloured: keep the threshold above a floor so a nearly blank slide stays blank
    thr = max(float(threshold_otsu(sat)), 15.0)
    mask = (sat > thr) & (hsv[..., 2] > 38)
    if mask.mean() < FAINT_FRACTION:
        mask |= stain_density_mask(rgb) & (hsv[..., 2] > 38)
    return _clean(mask, pixel_um)


def _flat(rgb: npt.NDArray[np.uint8]) -> bool:
    """Whether the image is one tone (its grey values span fewer than 8 levels after a light blur)."""
    grey = cv2.GaussianBlur(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), (0, 0), 1.0)
    return int(grey.max()) - int(grey.min()) < 8


def stain_density_mask(rgb: npt.NDArray[np.uint8]) -> BoolArray:
    """Pixels whose stain optical density (H + E + DAB from :func:`skimage.color.rgb2hed`, above the glass
    level) Otsu separates from glass: finds tissue that is dark but not coloured (IHC, pale fragments)."""
    hed = rgb2hed(rgb)
    od = cv2.GaussianBlur(np.clip(hed, 0, None).sum(-1).astype(np.float32), (0, 0), 1.0)
    glass = float(np.percentile(od, 5))  # the lightest pixels are glass on any slide with a margin
    od -= glass
    if float(od.max()) < OD_FLOOR:
        return np.zeros(od.shape, dtype=bool)
    thr = max(float(threshold_otsu(od)), OD_FLOOR)
    return np.asarray(od > thr, dtype=bool)


def _clean(mask: BoolArray, pixel_um: float | None) -> BoolArray:
    """Morphology at the mask's scale: close gaps, drop dust, fill small lumina."""
    um = pixel_um or TISSUE_MPP
    radius = max(1, round(16.0 / um))
    mask = closing(mask, disk(radius))
    mask = opening(mask, disk(max(1, radius // 2)))
    min_area = max(4, round((100.0 / um) ** 2))  # objects smaller than ~100 µm square are dust
    mask = remove_small_objects(mask, max_size=min_area)
    mask = remove_small_holes(mask, max_size=min_area)
    return np.asarray(mask, dtype=bool)


def compute_tissue(slide: Slide) -> TissueMask:
    """Tissue mask of a whole slide at ~8 µm/px (or 16x down without mpp), from its best pyramid level."""
    w, h = slide.dimensions
    ds = slide.downsample_for_mpp(TISSUE_MPP) if slide.mpp else TISSUE_DOWNSAMPLE
    ds = max(1.0, ds, max(w, h) / TISSUE_MAX_SIZE)
    out = (max(1, round(w / ds)), max(1, round(h / ds)))
    rgb = slide.read((0, 0), out, downsample=ds)
    pixel_um = slide.mpp * ds if slide.mpp else None
    return TissueMask(tissue_mask_from_rgb(rgb, pixel_um), ds)
