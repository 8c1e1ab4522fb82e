"""The reviewer's label operations as pure geometry: brush strokes, the wand, selections, and undo/redo.

Everything here is in level-0 pixels and returns shapely geometry or plain values; nothing is stored. The
:class:`~al_core.project.project.Project` methods (``paint``, ``erase``, ``accept_prediction``,
``edit_annotation``, ``revert_patch``) save what these functions compute, each as one label version through
the transactional :meth:`~al_core.project.labels.LabelVersions.edit`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt
import shapely
from shapely.geometry import LineString, Point, Polygon
from shapely.geometry.base import BaseGeometry

from al_core.wsi.raster import mask_to_shapes, polygonal_part
from al_core.wsi.slides import Slide

#: (class index, geometry in level-0 px)
Shape = tuple[int, BaseGeometry]
#: how a new region combines with a selection: replace it, add to it (Shift), subtract from it (Alt)
Combine = Literal["replace", "add", "subtract"]

#: brush sizes a reviewer steps through with ``[`` and ``]`` (µm, radius)
BRUSH_STEPS_UM = (2.0, 3.0, 5.0, 8.0, 12.0, 20.0, 30.0, 50.0, 80.0, 120.0)
#: wand tolerance: CIE76 ΔE in Lab from the clicked colour (≈2.3 is a just-noticeable difference)
WAND_TOLERANCE = 12.0
#: holes in a wand region up to this fraction of its area are filled
HOLE_FRACTION = 0.02


def brush_region(points: Sequence[tuple[float, float]], radius_um: float, mpp: float | None) -> BaseGeometry:
    """The area a brush of ``radius_um`` covers along a polyline of level-0 points (a dot for one point).

    On a slide without a scale (``mpp`` None) the radius is taken in level-0 pixels."""
    if not points:
        raise ValueError("a brush stroke needs at least one point")
    if radius_um <= 0:
        raise ValueError(f"brush radius must be positive, got {radius_um}")
    radius = radius_um / mpp if mpp else radius_um
    pts = [(float(x), float(y)) for x, y in points]
    # a stroke that never moved (a click) is a dot; LineString needs two distinct points
    path: BaseGeometry = Point(pts[0]) if len(set(pts)) == 1 else LineString(pts)
    return path.buffer(radius, quad_segs=8)


def step_brush(radius_um: float, steps: int) -> float:
    """The brush radius ``steps`` notches up (``]``) or down (``[``) :data:`BRUSH_STEPS_UM` from ``radius_um``."""
    idx = int(np.argmin([abs(s - radius_um) for s in BRUSH_STEPS_UM]))
    return BRUSH_STEPS_UM[min(max(idx + steps, 0), len(BRUSH_STEPS_UM) - 1)]


def combine(selection: BaseGeometry | None, region: BaseGeometry, how: Combine) -> BaseGeometry:
    """A selection after a new ``region``: replaced by it, with it added, or with it subtracted."""
    if how == "replace" or selection is None or selection.is_empty:
        out = region if how != "subtract" else Polygon()
    elif how == "add":
        out = selection.union(region)
    else:
        out = selection.difference(region)
    return polygonal_part(shapely.make_valid(out))


def paint(shapes: Sequence[Shape], region: BaseGeometry, class_idx: int) -> list[Shape]:
    """Labels after painting ``region`` with ``class_idx`` (0: background): what lies under the region is
    replaced, the rest is kept. The same rule :meth:`LabelVersions.edit` stores."""
    out = _cut(shapes, region, None)
    return out + ([(class_idx, region)] if class_idx else [])


def erase(shapes: Sequence[Shape], region: BaseGeometry, class_idx: int | None = None) -> list[Shape]:
    """Labels after erasing ``region`` to background, only from ``class_idx`` when given (class-aware)."""
    return _cut(shapes, region, class_idx)


def _cut(shapes: Sequence[Shape], region: BaseGeometry, only: int | None) -> list[Shape]:
    out: list[Shape] = []
    for cls, geom in shapes:
        rest = geom if only is not None and cls != only else geom.difference(region)
        if not rest.is_empty and rest.area > 0:
            out.append((cls, rest))
    return out


def class_areas(shapes: Sequence[Shape]) -> dict[int, float]:
    """Visible area per class (later shapes paint over earlier ones, as in the tiles and masks)."""
    seen: dict[int, BaseGeometry] = {}
    for cls, geom in shapes:
        seen = {c: g.difference(geom) for c, g in seen.items()}
        seen[cls] = seen[cls].union(geom) if cls in seen else geom
    return {c: float(g.area) for c, g in seen.items() if c}


def wand_mask(rgb: npt.NDArray[np.uint8], seed: tuple[int, int], tolerance: float = WAND_TOLERANCE,
              sigma: float = 1.0) -> npt.NDArray[np.bool_]:
    """Pixels connected to ``seed`` (col, row) whose colour is within ``tolerance`` ΔE (CIE76, in Lab) of the
    seed's: a flood fill over the colour distance, after a light blur so texture does not break the region."""
    from skimage.color import deltaE_cie76, rgb2lab
    from skimage.filters import gaussian
    from skimage.morphology import remove_small_holes
    from skimage.segmentation import flood

    h, w = rgb.shape[:2]
    col, row = seed
    if not (0 <= col < w and 0 <= row < h):
        raise ValueError(f"wand seed {seed} lies outside the {w}x{h} image")
    lab = rgb2lab(gaussian(rgb, sigma=sigma, channel_axis=-1, preserve_range=False) if sigma > 0 else rgb)
    dist = deltaE_cie76(lab, lab[row, col][None, None, :])
    region = flood(dist, (row, col), tolerance=tolerance)
    # small holes (a nucleus inside a selected gland) belong to the clicked region; large ones (a gland the
    # clicked stroma surrounds) do not
    max_hole = max(64, int(region.sum() * HOLE_FRACTION))
    return np.asarray(remove_small_holes(region, max_size=max_hole), dtype=bool)


def wand_region(rgb: npt.NDArray[np.uint8], seed: tuple[int, int], origin: tuple[float, float],
                downsample: float, tolerance: float = WAND_TOLERANCE) -> BaseGeometry:
    """:func:`wand_mask` of an image read at ``downsample`` from level-0 ``origin``, as level-0 polygons
    smoothed to half a screen pixel (the zoom it was read at)."""
    mask = wand_mask(rgb, seed, tolerance)
    shapes = mask_to_shapes(mask.astype(np.uint8), offset=origin, scale=downsample)
    if not shapes:
        return Polygon()
    geom = shapes[0][1].simplify(downsample * 0.5)
    return polygonal_part(shapely.make_valid(geom))


#: side (screen px) of the image the wand reads around a click: the region it can select at that zoom
WAND_WINDOW = 384


def wand_at(slide: Slide, x: float, y: float, downsample: float, tolerance: float = WAND_TOLERANCE,
            window: int = WAND_WINDOW) -> BaseGeometry:
    """The wand's region around level-0 point (x, y) on ``slide``, read at ``downsample`` (the zoom the
    reviewer sees), clipped to the slide; ``window`` screen px square at most."""
    ds = max(float(downsample), 1e-6)
    w0, h0 = slide.dimensions
    half = window * ds / 2
    x0, y0 = max(0, int(x - half)), max(0, int(y - half))
    x1, y1 = min(w0, int(x + half)), min(h0, int(y + half))
    size = (max(1, int((x1 - x0) / ds)), max(1, int((y1 - y0) / ds)))
    rgb = slide.read((x0, y0), size, downsample=ds)
    seed = (min(int((x - x0) / ds), size[0] - 1), min(int((y - y0) / ds), size[1] - 1))
    return wand_region(rgb, seed, (x0, y0), ds, tolerance)


def annotation_at(shapes: Sequence[tuple[int, int, BaseGeometry]], x: float, y: float) -> int | None:
    """The id of the topmost (last) of ``(id, class, geometry)`` that contains level-0 point (x, y)."""
    pt = Point(x, y)
    hits = [i for i, _, g in shapes if g.covers(pt)]
    return hits[-1] if hits else None


@dataclass
class EditHistory:
    """Undo and redo across saves: each saved edit is (region, version before, version after); undoing
    reverts the region to the version before, redoing to the one after (both as new versions)."""

    done: list[tuple[BaseGeometry, int, int]] = field(default_factory=list)
    undone: list[tuple[BaseGeometry, int, int]] = field(default_factory=list)

    def record(self, region: BaseGeometry, before: int, after: int) -> None:
        """A new saved edit; it drops what could be redone (as every editor does)."""
        self.done.append((region, before, after))
        self.undone.clear()

    def undo(self) -> tuple[BaseGeometry, int] | None:
        """(region, version to revert it to) for the last edit, or None when there is none."""
        if not self.done:
            return None
        item = self.done.pop()
        self.undone.append(item)
        return item[0], item[1]

    def redo(self) -> tuple[BaseGeometry, int] | None:
        """(region, version to revert it to) for the last undone edit, or None."""
        if not self.undone:
            return None
        item = self.undone.pop()
        self.done.append(item)
        return item[0], item[2]
