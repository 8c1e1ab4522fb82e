"""Smooth vector outlines of a predicted class map, for drawing a prediction as contours instead of pixels."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import shapely
from shapely.geometry.base import BaseGeometry

from al_core.project.label_edits import Shape
from al_core.wsi.raster import mask_to_shapes, polygonal_part


def smooth_contours(classes: npt.NDArray[np.uint8], offset: tuple[float, float], scale: float,
                    smooth: float = 0.75) -> list[Shape]:
    """(class, polygon) per predicted class of a patch's class map, in level-0 px (``x = offset + col * scale``),
    with the pixel stair-steps rounded off: a closing then an opening by ``smooth`` mask pixels, so corners
    round and specks under ~1.5 mask pixels go, while every larger region keeps its place and size."""
    r = smooth * scale
    out: list[Shape] = []
    for cls, geom in mask_to_shapes(np.asarray(classes), offset=offset, scale=scale):
        soft: BaseGeometry = geom.buffer(r, quad_segs=4).buffer(-2 * r, quad_segs=4).buffer(r, quad_segs=4)
        soft = polygonal_part(shapely.make_valid(soft.simplify(scale * 0.25)))
        if not soft.is_empty:
            out.append((cls, soft))
    return out
