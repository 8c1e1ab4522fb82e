"""Raster <-> vector (al_core.wsi.raster): masks to polygons and back, painting order, polygonal parts."""

from __future__ import annotations

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import shapely
from hypothesis import given, settings
from hypothesis import strategies as st
from shapely.geometry import GeometryCollection, LineString, MultiPolygon, Point, Polygon, box

from al_core.wsi.raster import mask_to_shapes, polygonal_part, rasterize


def test_rasterize_and_vectorise_are_inverse():
    mask = np.zeros((64, 80), np.uint8)
    mask[10:30, 5:25] = 1
    mask[40:60, 40:75] = 2
    mask[45:50, 50:55] = 0  # a hole
    shapes = mask_to_shapes(mask, offset=(1000, 2000), scale=4.0)
    assert [c for c, _ in shapes] == [1, 2]
    back = rasterize(shapes, (1000, 2000), 4.0, (80, 64))
    assert np.array_equal(back, mask)


def test_polygons_have_pixel_edge_boundaries_in_level0_coordinates():
    mask = np.zeros((10, 10), np.uint8)
    mask[2:5, 3:7] = 1
    [(cls, geom)] = mask_to_shapes(mask, offset=(100, 200), scale=2.0)
    assert cls == 1 and geom.equals(box(106, 204, 114, 210))
    assert mask_to_shapes(np.zeros((5, 5), np.uint8)) == []
    with pytest.raises(ValueError, match="must be 2-D"):
        mask_to_shapes(np.zeros((2, 2, 3), np.uint8))


def test_later_shapes_paint_over_earlier_ones():
    shapes = [(1, box(0, 0, 8, 8)), (2, box(4, 4, 8, 8)), (3, Polygon())]
    out = rasterize(shapes, (0, 0), 1.0, (8, 8))
    assert (out[:4, :] == 1).all() and (out[4:, 4:] == 2).all() and (out[4:, :4] == 1).all()
    assert (rasterize([], (0, 0), 1.0, (3, 2), fill=7) == 7).all()
    assert rasterize([], (0, 0), 1.0, (3, 2)).shape == (2, 3)
    # a 2x downsample: each output pixel is 2 level-0 px, the origin shifts the window
    half = rasterize([(1, box(10, 10, 14, 12))], (10, 10), 2.0, (4, 4))
    assert half[0, :2].tolist() == [1, 1] and half[1:].sum() == 0 and half[0, 2:].sum() == 0


def test_polygonal_part_drops_lines_and_points():
    sq = box(0, 0, 1, 1)
    assert polygonal_part(sq) is sq
    mixed = GeometryCollection([sq, LineString([(0, 0), (5, 5)]), Point(3, 3), box(2, 2, 3, 3)])
    part = polygonal_part(mixed)
    assert isinstance(part, MultiPolygon) and part.area == pytest.approx(2.0)
    assert polygonal_part(GeometryCollection([Point(0, 0)])).is_empty


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.uint8, st.tuples(st.integers(1, 24), st.integers(1, 24)), elements=st.integers(0, 2)))
def test_each_class_is_one_valid_geometry_equal_to_the_union_of_its_pixels(mask):
    # random masks are full of regions meeting at a corner only: they must still make one valid geometry
    shapes = mask_to_shapes(mask, scale=2.0)
    assert [c for c, _ in shapes] == sorted({1, 2} & set(np.unique(mask).tolist()))
    for cls, geom in shapes:
        assert geom.is_valid
        cells = shapely.union_all([box(2 * x, 2 * y, 2 * x + 2, 2 * y + 2) for y, x in np.argwhere(mask == cls)])
        assert geom.symmetric_difference(cells).area == 0
    assert np.array_equal(rasterize(shapes, (0, 0), 2.0, mask.shape[::-1]), mask)
