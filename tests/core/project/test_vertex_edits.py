"""Vertex edits of a saved polygon (al_core.project.vertex_edits): hand-checked areas on squares, holes kept,
multipolygon numbering, and the edits that cannot stand refused with a reason."""

from __future__ import annotations

import pytest
from shapely.geometry import MultiPolygon, Polygon, box

from al_core.project.vertex_edits import delete_vertex, insert_vertex, move_vertex, vertices


def test_move_insert_delete_on_a_square():
    sq = box(0, 0, 10, 10)  # shapely's box: (10,0) (10,10) (0,10) (0,0)
    assert len(vertices(sq)) == 4
    i = vertices(sq).index((10.0, 10.0))
    moved = move_vertex(sq, i, 20, 20)  # the corner pulled out: a kite of area 100 + 2 triangles of 50
    assert moved.area == pytest.approx(200.0)
    after = vertices(sq).index((10.0, 0.0))  # the edge from (10,0) to (10,10)
    bumped = insert_vertex(sq, after, 15, 5)
    assert len(vertices(bumped)) == 5 and bumped.area == pytest.approx(125.0)
    assert delete_vertex(bumped, vertices(bumped).index((15.0, 5.0))).equals(sq)
    triangle = delete_vertex(sq, i)
    assert triangle.area == pytest.approx(50.0)


def test_holes_stay_and_parts_are_numbered_in_order():
    ring = Polygon(box(0, 0, 10, 10).exterior.coords, [box(4, 4, 6, 6).exterior.coords])
    moved = move_vertex(ring, vertices(ring).index((10.0, 10.0)), 20, 20)
    assert len(moved.interiors) == 1 and moved.area == pytest.approx(200.0 - 4.0)
    two = MultiPolygon([box(0, 0, 1, 1), box(5, 5, 7, 7)])
    assert len(vertices(two)) == 8
    k = vertices(two).index((7.0, 7.0))
    assert k >= 4  # the second part's vertices come after the first's
    out = move_vertex(two, k, 9, 9)
    assert isinstance(out, MultiPolygon) and out.geoms[0].equals(box(0, 0, 1, 1))
    assert out.area == pytest.approx(1.0 + 4.0 + 4.0)


def test_edits_that_cannot_stand_are_refused():
    tri = Polygon([(0, 0), (10, 0), (0, 10)])
    with pytest.raises(ValueError, match="three vertices"):
        delete_vertex(tri, 0)
    sq = box(0, 0, 10, 10)
    with pytest.raises(ValueError, match="cross itself"):  # (10,10) dragged across the opposite edge
        move_vertex(sq, vertices(sq).index((10.0, 10.0)), -5, 5)
    with pytest.raises(ValueError, match="vertex 9 does not exist"):
        move_vertex(sq, 9, 1, 1)
    with pytest.raises(ValueError, match="only polygons"):
        vertices(sq.exterior)
