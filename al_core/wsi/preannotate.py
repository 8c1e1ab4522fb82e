"""Classical pre-annotation: a first-pass label from a hematoxylin threshold, like QuPath's thresholder.

It is what a pathologist often starts from before correcting: cell-dense, hematoxylin-rich tissue (e.g.
epidermis/epithelium) after colour deconvolution (Ruifrok & Johnston, ``skimage.color.rgb2hed``), Otsu and
morphology at low resolution. It is rough on purpose-free grounds: uncorrected, it over-calls dense stroma
and inflammation and misses pale epithelium — which is exactly what the review loop is for.
"""

from __future__ import annotations

import cv2
import numpy as np
import numpy.typing as npt
from shapely.geometry.base import BaseGeometry
from skimage.color import rgb2hed
from skimage.filters import threshold_otsu
from skimage.morphology import closing, disk, opening, remove_small_holes, remove_small_objects

from al_core.wsi.raster import mask_to_shapes
from al_core.wsi.slides import Slide

#: µm per pixel the threshold runs at: nuclei blur into cell-dense regions at this scale
PREANNOTATION_MPP = 4.0


def hematoxylin_mask(rgb: npt.NDArray[np.uint8], tissue: npt.NDArray[np.bool_] | None = None,
                     pixel_um: float = PREANNOTATION_MPP) -> npt.NDArray[np.bool_]:
    """Regions dense in hematoxylin: deconvolve, smooth ~10 µm, Otsu over tissue pixels, clean up."""
    h = rgb2hed(rgb)[..., 0]
    h = cv2.GaussianBlur(h.astype(np.float32), (0, 0), max(1.0, 10.0 / pixel_um))
    values = h[tissue] if tissue is not None and tissue.any() else h.ravel()
    mask = h > threshold_otsu(values)
    if tissue is not None:
        mask &= tissue
    r = max(1, round(12.0 / pixel_um))
    mask = opening(closing(mask, disk(r)), disk(r))
    area = max(4, round((60.0 / pixel_um) ** 2))
    mask = remove_small_holes(remove_small_objects(mask, max_size=area), max_size=area)
    return np.asarray(mask, dtype=bool)


def preannotate(slide: Slide, class_idx: int = 1, tissue: npt.NDArray[np.bool_] | None = None,
                tissue_downsample: float | None = None, simplify_um: float = 4.0) -> list[tuple[int, BaseGeometry]]:
    """Pre-annotation polygons of one class for a whole slide, in level-0 pixels."""
    w, hgt = slide.dimensions
    ds = slide.downsample_for_mpp(PREANNOTATION_MPP) if slide.mpp else 8.0
    ds = max(1.0, ds)
    size = (max(1, round(w / ds)), max(1, round(hgt / ds)))
    rgb = slide.read((0, 0), size, downsample=ds)
    t = None
    if tissue is not None and tissue_downsample is not None:
        t = cv2.resize(tissue.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST).astype(bool)
    mask = hematoxylin_mask(rgb, t, (slide.mpp or 0.5) * ds)
    tol = simplify_um / (slide.mpp or 0.5)
    return [(class_idx, g.simplify(tol)) for _, g in mask_to_shapes(mask.astype(np.uint8), scale=ds)]
