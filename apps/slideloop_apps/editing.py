"""The review map's tools between the browser and :mod:`al_core`: brush, eraser, accept-brush, wand and polygon
selection. Traits only, no ipywidgets import; the widgets (:mod:`slideloop_apps.review`) forward canvas events
here, in screen pixels of the map, with the map's centre and zoom."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from shapely.geometry.base import BaseGeometry
from traitlets import Float, HasTraits, Instance, Int, Unicode

from al_core.errors import SlideloopError
from al_core.project.label_edits import (
    WAND_TOLERANCE,
    Combine,
    annotation_at,
    brush_region,
    combine,
    step_brush,
    wand_at,
)
from al_core.project.vertex_edits import (
    MAX_EDITABLE_VERTICES,
    delete_vertex,
    insert_vertex,
    move_vertex,
    vertices,
)
from al_core.tiles.pyramid import Pyramid
from slideloop_apps.state import ACCEPT, AppState

#: the map tools; "pan" leaves the mouse to the map
TOOLS = ("pan", "brush", "eraser", "accept", "wand", "select")


def screen_to_slide(pyramid: Pyramid, center: Sequence[float], zoom: float, size: Sequence[float],
                    point: Sequence[float]) -> tuple[float, float]:
    """Level-0 px under a point of the map's container (px from its top-left), for Leaflet's Simple CRS
    centred on ``center`` (lat, lng) at ``zoom`` in a container of ``size`` (w, h)."""
    scale = 2.0**zoom
    wx = center[1] * scale + point[0] - size[0] / 2
    wy = -center[0] * scale + point[1] - size[1] / 2
    return pyramid.from_latlng(-wy / scale, wx / scale)


def slide_to_offset(pyramid: Pyramid, center: Sequence[float], zoom: float, x: float, y: float) -> tuple[float, float]:
    """Where level-0 px (x, y) is on screen, in px from the map container's centre (the inverse of
    :func:`screen_to_slide`; the browser adds half its size, which only it knows)."""
    lat, lng = pyramid.to_latlng(x, y)
    scale = 2.0**zoom
    return lng * scale - center[1] * scale, -lat * scale + center[0] * scale


def level0_per_screen_px(pyramid: Pyramid, zoom: float) -> float:
    """How many level-0 px one screen px spans at ``zoom``."""
    return float(2.0 ** (pyramid.zmax - zoom))


class Editor(HasTraits):
    """The current tool and its settings, and what it has selected, for one :class:`AppState`."""

    state = Instance(AppState)
    tool = Unicode("pan")
    #: brush radius, µm (level-0 px on a slide without a scale)
    radius_um = Float(8.0)
    #: wand tolerance, ΔE in Lab
    tolerance = Float(WAND_TOLERANCE)
    #: the wand's selection (level-0 px) before it is applied; None when nothing is selected
    selection = Instance(BaseGeometry, allow_none=True)
    #: the saved polygon picked with the select tool
    picked = Int(None, allow_none=True)

    def __init__(self, state: AppState, **kwargs: Any) -> None:
        super().__init__(state=state, **kwargs)
        state.observe(lambda _: self.clear(), names=["patch_id", "slide_id"])

    def set_tool(self, tool: str) -> None:
        """Switch tools; the wand's unapplied selection and the picked polygon stay until Esc."""
        if tool not in TOOLS:
            raise ValueError(f"unknown tool {tool!r}; one of {', '.join(TOOLS)}")
        self.tool = tool
        self.state.say(_TOOL_HELP[tool].format(r=self.radius_um, t=self.tolerance))

    def clear(self) -> None:
        """Drop the wand's selection and the picked polygon."""
        self.selection = None
        self.picked = None

    def resize(self, steps: int) -> float:
        """Brush ``steps`` notches larger (``]``) or smaller (``[``); returns the new radius (µm)."""
        self.radius_um = step_brush(self.radius_um, steps)
        self.state.say(f"Brush radius {self.radius_um:g} µm.")
        return self.radius_um

    # --- events from the map ---------------------------------------------------------------------------
    def stroke(self, points: Sequence[tuple[float, float]]) -> bool:
        """A brush, eraser or accept stroke along level-0 points: queued for Save."""
        mode = {"brush": self.state.mode, "eraser": 0, "accept": ACCEPT}.get(self.tool)
        if mode is None or not points:
            return False
        try:
            region = brush_region(points, self.radius_um, self.state.mpp())
        except ValueError as err:
            self.state.say(f"Stroke not used: {err}", "error")
            return False
        return self.state.add_region(mode, region, "brush stroke" if self.tool != "eraser" else "eraser stroke")

    def wand(self, x: float, y: float, downsample: float, how: Combine = "replace") -> BaseGeometry | None:
        """Select around level-0 (x, y) at ``downsample`` (Shift: ``add``, Alt: ``subtract``); a preview
        until :meth:`apply`."""
        try:
            with self.state.project.open_slide(self.state.slide_id) as slide:
                region = wand_at(slide, x, y, max(1.0, downsample), self.tolerance)
        except (SlideloopError, ValueError) as err:
            self.state.say(f"Wand: {err}", "error")
            return None
        self.selection = combine(self.selection, region, how)
        area = self.selection.area * (self.state.mpp() or 1) ** 2
        unit = "µm²" if self.state.mpp() else "px²"
        self.state.say(f"Wand selection {area:,.0f} {unit} (tolerance {self.tolerance:g}; Shift-click adds, "
                       "Alt-click subtracts). Save (s) or Enter applies it; Esc drops it.")
        return self.selection

    def apply(self) -> bool:
        """Queue the wand's selection with the active class (or erase), then forget it."""
        if self.selection is None or self.selection.is_empty:
            return False
        ok = self.state.add_region(self.state.mode, self.selection, "wand selection")
        self.selection = None
        return ok

    def pick(self, x: float, y: float) -> int | None:
        """Pick the saved polygon under level-0 (x, y) (select tool)."""
        anns = self.state.project.annotations(self.state.slide_id, region=(x - 1, y - 1, x + 1, y + 1))
        self.picked = annotation_at([(a.id, a.class_idx, a.geometry) for a in anns], x, y)
        if self.picked is None:
            self.state.say("No saved polygon there.")
        else:
            self.state.say(f"Polygon {self.picked} picked: drag a vertex to move it, drag an edge's midpoint to "
                           "add one, Alt-click a vertex to delete it; a class key (1–9) changes its class, Delete "
                           "removes it. Each is saved as a new label version.")
        return self.picked

    def picked_geometry(self) -> BaseGeometry | None:
        """The picked polygon's saved geometry (level-0 px), or None."""
        if self.picked is None:
            return None
        return next((a.geometry for a in self.state.project.annotations(self.state.slide_id)
                     if a.id == self.picked), None)

    def editable_vertices(self) -> list[tuple[float, float]]:
        """The picked polygon's vertices to show as handles (none when nothing is picked or it has too many)."""
        geom = self.picked_geometry()
        if geom is None:
            return []
        try:
            pts = vertices(geom)
        except ValueError:
            return []
        return pts if len(pts) <= MAX_EDITABLE_VERTICES else []

    def edit_vertex(self, op: str, index: int, x: float = 0.0, y: float = 0.0) -> int | None:
        """Move vertex ``index`` of the picked polygon to level-0 (x, y), insert one after it at (x, y), or
        delete it (``op``: move, insert, delete); saved as one label version, and the polygon stays picked."""
        geom, st, picked = self.picked_geometry(), self.state, self.picked
        if geom is None or picked is None:
            return None
        edits = {"move": lambda: move_vertex(geom, index, x, y), "insert": lambda: insert_vertex(geom, index, x, y),
                 "delete": lambda: delete_vertex(geom, index)}
        if op not in edits:
            raise ValueError(f"unknown vertex edit {op!r}")
        try:
            new = edits[op]()
        except ValueError as err:
            st.say(f"Not changed: {err}.", "error")
            return None
        before = st.project.label_version(st.slide_id)
        try:
            version = st.project.edit_annotation(st.slide_id, picked, geometry=new, author=st.author,
                                                 patch_id=st.patch_id)
        except SlideloopError as err:
            st.say(f"Not changed: {err}", "error")
            return None
        st.history.record(geom.union(new), before, version)
        st.refetch()
        st.refresh_queue(keep_order=True)
        # the reshaped polygon is a new row: pick it again so the next drag edits it
        px, py = new.representative_point().coords[0]
        anns = st.project.annotations(st.slide_id, region=(px - 1, py - 1, px + 1, py + 1))
        self.picked = annotation_at([(a.id, a.class_idx, a.geometry) for a in anns], px, py)
        done = {"move": "Moved a vertex of", "insert": "Added a vertex to", "delete": "Deleted a vertex of"}[op]
        st.say(f"{done} the polygon (label version {version}).")
        return version

    def edit_picked(self, class_idx: int | None = None, delete: bool = False) -> int | None:
        """Change the picked polygon's class or delete it, as one label version."""
        if self.picked is None:
            return None
        st = self.state
        before = st.project.label_version(st.slide_id)
        old = next((a for a in st.project.annotations(st.slide_id) if a.id == self.picked), None)
        try:
            version = st.project.edit_annotation(st.slide_id, self.picked, class_idx=class_idx, delete=delete,
                                                 author=st.author, patch_id=st.patch_id)
        except SlideloopError as err:
            st.say(f"Not changed: {err}", "error")
            return None
        if old is not None:
            st.history.record(old.geometry, before, version)
        st.refetch()
        st.refresh_queue(keep_order=True)
        st.say(f"{'Deleted' if delete else 'Changed the class of'} polygon {self.picked} (label version {version}).")
        self.picked = None
        return version


_TOOL_HELP = {
    "pan": "Pan: drag the map; pick a tool with b (brush), e (eraser), w (wand), c (accept prediction), v (select).",
    "brush": "Brush ({r:g} µm): paint the active class; [ and ] resize; Space+drag pans; s saves.",
    "eraser": "Eraser ({r:g} µm): paint background; [ and ] resize; s saves.",
    "accept": "Accept brush ({r:g} µm): where you paint, the label takes the model's prediction; s saves.",
    "wand": "Wand (tolerance {t:g}): click a region; Shift adds, Alt subtracts; - and = change the tolerance.",
    "select": "Select: click a saved polygon, then drag its vertices, 1–9 changes its class or Delete removes it.",
}
