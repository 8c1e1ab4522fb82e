"""Tile geometry of a slide in Leaflet's ``Simple`` CRS; pure arithmetic.

Zoom ``zmax = ceil(log2(max(W, H) / 256))`` is level-0 resolution, each zoom below halves it, zoom 0 fits the
slide in one tile. Tile (z, x, y) covers the level-0 square of side ``256 * 2**(zmax - z)`` whose top-left is
``(x, y) * that side``; a slide pixel (px, py) is at (lat, lng) = (-py / 2**zmax, px / 2**zmax).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import shapely
from shapely.geometry.base import BaseGeometry

from al_core.errors import TileRangeError

TILE = 256


@dataclass(frozen=True)
class Pyramid:
    """Tile geometry of a ``width`` x ``height`` (level-0 px) slide; pure arithmetic."""

    width: int
    height: int
    tile: int = TILE

    @property
    def zmax(self) -> int:
        """Top zoom, at level-0 resolution: ``ceil(log2(max(W, H) / tile))`` (0 for a slide within one tile)."""
        return max(0, math.ceil(math.log2(max(self.width, self.height) / self.tile)))

    def downsample(self, z: int) -> int:
        """Level-0 pixels per tile pixel at zoom ``z``: ``2**(zmax - z)``."""
        return int(2 ** (self.zmax - z))

    def grid_size(self, z: int) -> tuple[int, int]:
        """Number of tiles (columns, rows) at zoom ``z``."""
        side = self.tile * self.downsample(z)
        return math.ceil(self.width / side), math.ceil(self.height / side)

    def check(self, z: int, x: int, y: int) -> None:
        """Raise :class:`TileRangeError` unless (z, x, y) is a tile of this pyramid."""
        if not 0 <= z <= self.zmax:
            raise TileRangeError(f"zoom {z} outside 0..{self.zmax}")
        nx, ny = self.grid_size(z)
        if not (0 <= x < nx and 0 <= y < ny):
            raise TileRangeError(f"tile ({x}, {y}) outside the {nx}x{ny} tiles of zoom {z}")

    def region(self, z: int, x: int, y: int) -> tuple[int, int, int, int]:
        """Level-0 (x0, y0, side, downsample) of tile (z, x, y), with ``side = tile * downsample``."""
        ds = self.downsample(z)
        side = self.tile * ds
        return x * side, y * side, side, ds

    def valid_size(self, z: int, x: int, y: int) -> tuple[int, int]:
        """Output pixels (w, h) of tile (z, x, y) that lie on the slide; the rest is padding."""
        x0, y0, _, ds = self.region(z, x, y)
        return (min(self.tile, math.ceil((self.width - x0) / ds)), min(self.tile, math.ceil((self.height - y0) / ds)))

    def to_latlng(self, px: float, py: float) -> tuple[float, float]:
        """Slide pixel (px, py) → Leaflet (lat, lng) in the Simple CRS."""
        scale = 2.0**self.zmax
        return -py / scale, px / scale

    def from_latlng(self, lat: float, lng: float) -> tuple[float, float]:
        """Leaflet (lat, lng) → slide pixel (px, py)."""
        scale = 2.0**self.zmax
        return lng * scale, -lat * scale

    def geometry_from_map(self, geom: BaseGeometry) -> BaseGeometry:
        """A shape drawn on the map (lng, lat) → the same shape in slide pixels (x, y)."""
        scale = 2.0**self.zmax
        return shapely.transform(geom, lambda c: np.column_stack([c[:, 0] * scale, -c[:, 1] * scale]))

    def geometry_to_map(self, geom: BaseGeometry) -> BaseGeometry:
        """A shape in slide pixels (x, y) → map coordinates (lng, lat), for GeoJSON layers."""
        scale = 2.0**self.zmax
        return shapely.transform(geom, lambda c: np.column_stack([c[:, 0] / scale, -c[:, 1] / scale]))

    def bounds(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """The slide as Leaflet bounds ((south, west), (north, east))."""
        return self.to_latlng(0, self.height), self.to_latlng(self.width, 0)
