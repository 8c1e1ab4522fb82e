"""The project's patches: cutting the grid over every slide, and which patches count as labelled."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import shapely
from shapely.geometry import box
from shapely.geometry.base import BaseGeometry

from al_core.errors import GridError, ScaleError, UncalibratedError
from al_core.project.schema import PatchRow, SlideRow
from al_core.wsi.grid import GridSpec, grid_boxes, tissue_fractions

if TYPE_CHECKING:
    from al_core.wsi.tissue import TissueMask  # scipy and scikit-image: only for the type

#: a patch counts as reviewed when reviewed regions cover this share of it (a rebuilt grid of the same spec
#: covers exactly; a coarser one only where a reviewer saw the whole patch)
REVIEWED_COVER = 0.99


def patch_rows(slides: Sequence[SlideRow], spec: GridSpec, tissue: Callable[[SlideRow], TissueMask]) -> list[dict[str, Any]]:
    """The patch rows of ``spec`` over ``slides``: every grid position with at least ``spec.min_tissue``."""
    rows: list[dict[str, Any]] = []
    for slide in slides:
        if slide.mpp is None and spec.downsample is None:
            raise UncalibratedError(slide.name, "has no µm/px metadata (uncalibrated), so a grid in µm cannot "
                                                "be cut on it; cut the grid at a downsample, or give its µm/px")
        try:
            ds = spec.downsample_for(slide.mpp)
            boxes = grid_boxes(slide.width, slide.height, spec, ds)
        except GridError as err:
            raise GridError(f"slide {slide.name!r}: {err}") from None
        except ValueError as err:
            raise ScaleError(slide.path, str(err)) from err
        t = tissue(slide)
        frac = tissue_fractions(boxes, t.mask, t.downsample)
        rows.extend(
            dict(slide_id=slide.id, col=int(boxes.col[i]), row=int(boxes.row[i]), x=int(boxes.x[i]),
                 y=int(boxes.y[i]), size=boxes.size, patch=boxes.patch, downsample=ds, tissue=float(frac[i]))
            for i in np.flatnonzero(frac >= spec.min_tissue)
        )
    return rows


def patch_box(p: PatchRow) -> BaseGeometry:
    """A patch's level-0 square."""
    return box(p.x, p.y, p.x + p.size, p.y + p.size)


def touched_by(patches: Sequence[PatchRow], geoms: Sequence[BaseGeometry]) -> set[int]:
    """Ids of the patches whose square intersects any of ``geoms``."""
    if not geoms or not patches:
        return set()
    tree = shapely.STRtree(list(geoms))
    hit, _ = tree.query([patch_box(p) for p in patches], predicate="intersects")
    return {patches[i].id for i in set(hit.tolist())}


def covered_by(patches: Sequence[PatchRow], regions: Sequence[tuple[int, int, int]]) -> set[int]:
    """Ids of the patches that the (x, y, size) ``regions`` cover to :data:`REVIEWED_COVER` of their area."""
    if not regions or not patches:
        return set()
    squares = [box(x, y, x + s, y + s) for x, y, s in regions]
    tree = shapely.STRtree(squares)
    out = set()
    for p in patches:
        pb = patch_box(p)
        near = tree.query(pb, predicate="intersects")
        if len(near) and shapely.union_all([squares[i] for i in near]).intersection(pb).area >= REVIEWED_COVER * pb.area:
            out.add(p.id)
    return out
