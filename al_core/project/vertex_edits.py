"""Vertex editing of a saved polygon as pure geometry: list its vertices, move, insert or delete one.

Vertices are numbered across the exterior rings of a (multi)polygon's parts, in ring order, without the
ring's closing repeat; holes keep their shape. Every function returns a new valid geometry in level-0 px or
raises ``ValueError`` saying why the edit cannot stand (a ring under three vertices, a ring that crosses
itself), so nothing invalid reaches the store.
"""

from __future__ import annotations

from collections.abc import Callable

from shapely.geometry import MultiPolygon, Polygon
from shapely.geometry.base import BaseGeometry

#: (part index, vertex index within that part's exterior ring)
VertexRef = tuple[int, int]
#: a polygon with more vertices than this is not offered for vertex editing (its handles would hide the tissue)
MAX_EDITABLE_VERTICES = 400


def _parts(geom: BaseGeometry) -> list[Polygon]:
    if isinstance(geom, Polygon):
        return [geom]
    if isinstance(geom, MultiPolygon):
        return list(geom.geoms)
    raise ValueError(f"only polygons have vertices to edit, not a {geom.geom_type}")


def _ring(part: Polygon) -> list[tuple[float, float]]:
    return [(float(x), float(y)) for x, y in list(part.exterior.coords)[:-1]]


def vertices(geom: BaseGeometry) -> list[tuple[float, float]]:
    """The exterior vertices of every part, in the numbering the edits below use."""
    return [pt for part in _parts(geom) for pt in _ring(part)]


def _locate(geom: BaseGeometry, index: int) -> VertexRef:
    k = index
    for p, part in enumerate(_parts(geom)):
        n = len(part.exterior.coords) - 1
        if 0 <= k < n:
            return p, k
        k -= n
    raise ValueError(f"vertex {index} does not exist (the polygon has {len(vertices(geom))})")


def _edit(geom: BaseGeometry, index: int, change: Callable[[list[tuple[float, float]], int], None]) -> BaseGeometry:
    parts = _parts(geom)
    p, k = _locate(geom, index)
    ring = _ring(parts[p])
    change(ring, k)
    if len(set(ring)) < 3:
        raise ValueError("a polygon needs at least three vertices; delete the polygon instead")
    new = Polygon(ring, [list(h.coords) for h in parts[p].interiors])
    if not new.is_valid or new.area <= 0:
        raise ValueError("that edit makes the outline cross itself")
    out = parts[:p] + [new] + parts[p + 1:]
    return out[0] if len(out) == 1 else MultiPolygon(out)


def move_vertex(geom: BaseGeometry, index: int, x: float, y: float) -> BaseGeometry:
    """``geom`` with vertex ``index`` at level-0 (x, y)."""
    def change(ring: list[tuple[float, float]], k: int) -> None:
        ring[k] = (float(x), float(y))
    return _edit(geom, index, change)


def insert_vertex(geom: BaseGeometry, after: int, x: float, y: float) -> BaseGeometry:
    """``geom`` with a new vertex at (x, y) on the edge that leaves vertex ``after``."""
    def change(ring: list[tuple[float, float]], k: int) -> None:
        ring.insert(k + 1, (float(x), float(y)))
    return _edit(geom, after, change)


def delete_vertex(geom: BaseGeometry, index: int) -> BaseGeometry:
    """``geom`` without vertex ``index``."""
    def change(ring: list[tuple[float, float]], k: int) -> None:
        del ring[k]
    return _edit(geom, index, change)
