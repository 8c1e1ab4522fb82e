"""Raster <-> vector: class-index masks to polygons and polygons to masks, in level-0 pixel coordinates."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import rasterio.features
import shapely
from affine import Affine
from shapely.geometry import MultiPolygon, Polygon
from shapely.geometry.base import BaseGeometry


def polygonal_part(geom: BaseGeometry) -> BaseGeometry:
    """The (Multi)Polygon part of a geometry; make_valid can return collections with lines and points."""
    if isinstance(geom, Polygon | MultiPolygon):
        return geom
    polys: list[Polygon] = []
    for g in getattr(geom, "geoms", []):
        part = polygonal_part(g)
        polys.extend(getattr(part, "geoms", [part]) if not part.is_empty else [])
    return MultiPolygon(polys) if polys else Polygon()


def mask_to_shapes(
    mask: npt.NDArray[Any], *, offset: tuple[float, float] = (0.0, 0.0), scale: float = 1.0, background: int = 0
) -> list[tuple[int, BaseGeometry]]:
    """Vectorise a class-index mask into one (Multi)Polygon per class, with exact pixel-edge boundaries.

    ``offset``/``scale`` map mask pixels to level-0 pixels (x0 = offset_x + col * scale).
    """
    return [(cls, _join(parts)) for cls, parts in mask_to_parts(mask, offset=offset, scale=scale,
                                                                background=background)]


def mask_to_parts(
    mask: npt.NDArray[Any], *, offset: tuple[float, float] = (0.0, 0.0), scale: float = 1.0, background: int = 0
) -> list[tuple[int, list[Polygon]]]:
    """Each class's 4-connected regions as Polygons (exact pixel edges, holes included), by class index: what
    :func:`mask_to_shapes` joins, for callers that work part by part."""
    if mask.ndim != 2:
        raise ValueError(f"a label mask must be 2-D, got shape {mask.shape}")
    values = mask.astype(np.int32) if mask.dtype not in (np.uint8, np.int16, np.uint16, np.int32) else mask
    transform = Affine(scale, 0, offset[0], 0, scale, offset[1])
    found = list(rasterio.features.shapes(values, mask=values != background, transform=transform))
    if not found:
        return []
    polys = _polygons([g["coordinates"] for g, _ in found])
    by_class: dict[int, list[Polygon]] = {}
    for poly, (_, value) in zip(polys, found, strict=True):
        by_class.setdefault(int(value), []).append(poly)
    return sorted(by_class.items())


def _polygons(rings_of: list[Any]) -> list[Polygon]:
    """Polygons from GeoJSON-style ring lists (shell first, then holes), built in two vectorised GEOS calls:
    ``shapely.geometry.shape`` walks every vertex in Python, which dominated a whole-slide map's vectorising."""
    rings = [r for rs in rings_of for r in rs]
    coords = np.array([xy for r in rings for xy in r], dtype=np.float64)
    ring_ids = np.repeat(np.arange(len(rings)), [len(r) for r in rings])
    poly_ids = np.repeat(np.arange(len(rings_of)), [len(rs) for rs in rings_of])
    made = np.asarray(shapely.polygons(np.asarray(shapely.linearrings(coords, indices=ring_ids)), indices=poly_ids))
    polys: list[Polygon] = made.tolist()
    return polys


def _join(parts: list[Polygon]) -> BaseGeometry:
    """One class's polygonised parts as one geometry. They are its 4-connected components, so they meet at
    most at pixel corners and already make a valid MultiPolygon; a union of thousands of parts (a noisy
    whole-slide map) costs seconds for nothing, so it is only the fallback for an invalid result."""
    polys = [g for g in parts if isinstance(g, Polygon)]
    if len(polys) == len(parts) == 1 and polys[0].is_valid:
        return polys[0]
    joined = MultiPolygon(polys) if len(polys) == len(parts) > 1 else None
    return joined if joined is not None and joined.is_valid else shapely.union_all(parts)


def rasterize(
    shapes: Sequence[tuple[int, BaseGeometry]],
    origin: tuple[float, float],
    downsample: float,
    out_size: tuple[int, int],
    fill: int = 0,
) -> npt.NDArray[np.uint8]:
    """Paint (class index, geometry) pairs, in order, into a ``out_size`` (w, h) mask whose top-left pixel
    is level-0 ``origin`` and whose pixels are ``downsample`` level-0 pixels wide."""
    w, h = out_size
    if not shapes:
        return np.full((h, w), fill, dtype=np.uint8)
    transform = Affine(downsample, 0, origin[0], 0, downsample, origin[1])
    mask = rasterio.features.rasterize(
        [(g, int(c)) for c, g in shapes if not g.is_empty],
        out_shape=(h, w), transform=transform, fill=fill, dtype=np.uint8,
    )
    return np.asarray(mask, dtype=np.uint8)
