"""Tile pyramid arithmetic (al_core.tiles.pyramid): zoom levels, tile regions, map coordinates."""

from __future__ import annotations

import pytest
from shapely.geometry import box

from al_core.errors import TileRangeError
from al_core.tiles.pyramid import Pyramid


class TestPyramid:
    @pytest.mark.parametrize(("size", "zmax"), [((256, 256), 0), ((100, 30), 0), ((257, 10), 1), ((512, 512), 1),
                                                 ((2220, 2967), 4), ((100_000, 80_000), 9)])
    def test_zmax_is_full_resolution(self, size: tuple[int, int], zmax: int) -> None:
        pyr = Pyramid(*size)
        assert pyr.zmax == zmax
        assert pyr.downsample(zmax) == 1
        assert pyr.grid_size(0) == (1, 1)  # zoom 0 fits the slide in one tile

    def test_grid_sizes_of_the_sample(self) -> None:
        pyr = Pyramid(2220, 2967)
        assert [pyr.grid_size(z) for z in range(5)] == [(1, 1), (2, 2), (3, 3), (5, 6), (9, 12)]
        assert pyr.region(2, 1, 2) == (1024, 2048, 1024, 4)
        assert pyr.valid_size(4, 8, 11) == (2220 - 8 * 256, 2967 - 11 * 256)
        assert pyr.valid_size(3, 0, 0) == (256, 256)

    @pytest.mark.parametrize(("z", "x", "y"), [(5, 0, 0), (-1, 0, 0), (4, 9, 0), (4, 0, 12), (0, 1, 0), (2, -1, 0)])
    def test_out_of_range(self, z: int, x: int, y: int) -> None:
        with pytest.raises(TileRangeError):
            Pyramid(2220, 2967).check(z, x, y)

    def test_latlng_round_trip_and_bounds(self) -> None:
        pyr = Pyramid(2220, 2967)
        lat, lng = pyr.to_latlng(1600, 800)
        assert (lat, lng) == (-800 / 16, 1600 / 16)
        assert pyr.from_latlng(lat, lng) == (1600, 800)
        assert pyr.bounds() == ((-2967 / 16, 0.0), (0.0, 2220 / 16))

    def test_geometry_to_map_and_back(self) -> None:
        pyr = Pyramid(2220, 2967)
        g = box(100, 200, 300, 500)
        m = pyr.geometry_to_map(g)
        assert m.bounds == pytest.approx((100 / 16, -500 / 16, 300 / 16, -200 / 16))  # (lng, lat) bounds
        assert pyr.geometry_from_map(m).equals_exact(g, 1e-9)
