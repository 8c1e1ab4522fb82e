"""Class maps to QuPath GeoJSON polygons (cleaned of speckle, simplified to about one model pixel)."""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import numpy.typing as npt

from al_core._io import atomic_write_bytes
from al_core.deploy.config import InferenceConfig


def write_geojson(path: str | os.PathLike[str], cmap: npt.NDArray[np.uint8], ds: float, cfg: InferenceConfig,
                  max_side: int = 8192, min_pixels: int = 16) -> int:
    """QuPath GeoJSON polygons (level-0 coordinates) of each non-background class, simplified to about
    one model pixel. Regions and holes under ``min_pixels`` model pixels are dropped first (speckle makes
    huge, slow polygons and is no annotation); class maps larger than ``max_side`` are coarsened.
    Returns the feature count."""
    import shapely
    from shapely.geometry import MultiPolygon, Polygon
    from shapely.geometry.base import BaseGeometry

    from al_core.project.labels_io import geojson_bytes
    from al_core.wsi.raster import mask_to_parts

    step = max(1, math.ceil(max(cmap.shape) / max_side))
    small = np.array(cmap[::step, ::step] if step > 1 else cmap, dtype=np.uint8)
    bg = cfg.background_index
    limit = max(1, min_pixels // (step * step))
    for value in np.flatnonzero(np.bincount(small.ravel(), minlength=256)).tolist():
        if value == bg:
            continue
        m = small == value
        keep = ~_without_small(~_without_small(m, limit), limit)  # small regions dropped, then small holes filled
        small[m & ~keep] = bg
        small[keep & ~m & (small == bg)] = value  # filled holes that were background
    scale = ds * step
    by_idx = {c.index: c for c in cfg.classes}
    shapes: list[tuple[BaseGeometry, str, str]] = []
    for idx, parts in mask_to_parts(small, scale=scale, background=bg):
        # simplify each connected part on its own (one topology-preserving pass over a MultiPolygon of many
        # parts is quadratic); 4-connected regions meet at corners at most, so they need no union
        simplified = _simplify(np.array(parts, dtype=object), scale)
        kept: list[Polygon] = simplified[~shapely.is_empty(simplified)].tolist()
        if not kept:
            continue
        c = by_idx.get(idx)
        shapes.append((MultiPolygon(kept) if len(kept) > 1 else kept[0], c.name if c else f"Class {idx}",
                       c.color if c else "#808080"))
    atomic_write_bytes(path, geojson_bytes(shapes))
    return len(shapes)


def _simplify(parts: npt.NDArray[np.object_], tolerance: float) -> npt.NDArray[np.object_]:
    """Topology-preserving simplification of each part, split over two threads when there are many (GEOS
    runs without the GIL, and by the time the GeoJSON is the last output left a core is idle)."""
    import shapely

    def one(chunk: npt.NDArray[np.object_]) -> npt.NDArray[np.object_]:
        return np.asarray(shapely.simplify(chunk, tolerance, preserve_topology=True))

    if len(parts) < 512:
        return one(parts)
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="slideloop-simplify") as pool:
        return np.concatenate(list(pool.map(one, np.array_split(parts, 2))))


def _without_small(m: npt.NDArray[np.bool_], max_size: int) -> npt.NDArray[np.bool_]:
    """``m`` without its 4-connected regions of ``max_size`` pixels or fewer (one OpenCV labelling pass: a
    whole-slide map has tens of thousands of regions)."""
    import cv2

    n, labels, stats, _ = cv2.connectedComponentsWithStats(m.view(np.uint8), connectivity=4)
    big = stats[:, cv2.CC_STAT_AREA] > max_size
    big[0] = False  # label 0 is the background of m
    return np.asarray(big[labels])
