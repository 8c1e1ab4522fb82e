"""Turn complete labels into a plausible pre-annotation: drop objects, erode or dilate them, shift them.

Used by :mod:`al_core.learn.simulate` to start a strategy study from labels known to be complete. Objects are
the polygons of each class's pixels in a patch mask (``rasterio.features.shapes``, in level-0 coordinates);
each one independently is dropped with probability ``drop``, grown or shrunk by a buffer drawn from
``U(-morph_px, morph_px)`` patch pixels, and moved by up to ``shift_px`` patch pixels in x and y. Everything is
drawn from the generator passed in, so a seed fixes the pre-annotation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from affine import Affine
from rasterio import features
from shapely import affinity
from shapely.geometry import box, shape
from shapely.geometry.base import BaseGeometry

#: a (class index, geometry) pair, as the label store takes it
Shape = tuple[int, BaseGeometry]


@dataclass(frozen=True)
class Corruption:
    """How to damage labels: share of objects dropped, buffer and shift ranges in patch pixels."""

    drop: float = 0.3
    morph_px: float = 2.0
    shift_px: float = 2.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.drop <= 1.0 or self.morph_px < 0 or self.shift_px < 0:
            raise ValueError(f"corruption needs 0 <= drop <= 1 and non-negative morph/shift, got {self}")


def mask_shapes(mask: npt.NDArray[np.uint8], class_of_channel: Sequence[int], origin: tuple[float, float],
                downsample: float, clip: BaseGeometry) -> list[Shape]:
    """Polygons of every non-background channel of a patch mask (channels → project classes), in level-0
    coordinates, clipped to ``clip``; channel 0 (background) and the ignore index give none."""
    transform = Affine(downsample, 0, origin[0], 0, downsample, origin[1])
    out: list[Shape] = []
    for ch in range(1, len(class_of_channel)):
        on = mask == ch
        if not on.any():
            continue
        for geom, _ in features.shapes(on.astype(np.uint8), mask=on, transform=transform):
            g = shape(geom)
            g = (g if g.is_valid else g.buffer(0)).intersection(clip)
            if not g.is_empty and g.area > 0:
                out.append((int(class_of_channel[ch]), g))
    return out


def corrupt(shapes: Sequence[Shape], c: Corruption, rng: np.random.Generator, downsample: float,
            clip: BaseGeometry) -> list[Shape]:
    """The damaged copy of ``shapes`` (see the module docstring); ``downsample`` converts patch pixels to
    level-0 units."""
    out: list[Shape] = []
    for cls, g in shapes:
        if rng.random() < c.drop:
            continue
        if c.morph_px:
            g = g.buffer(float(rng.uniform(-c.morph_px, c.morph_px)) * downsample)
        if c.shift_px:
            dx, dy = rng.uniform(-c.shift_px, c.shift_px, 2) * downsample
            g = affinity.translate(g, float(dx), float(dy))
        g = g.intersection(clip)
        if not g.is_empty and g.area > 0:
            out.append((cls, g))
    return out


def inner_box(x: float, y: float, size: float) -> BaseGeometry:
    """A patch's square a hair inside its edges, so an edit never touches (and so labels) the neighbours."""
    return box(x + 1e-3, y + 1e-3, x + size - 1e-3, y + size - 1e-3)
