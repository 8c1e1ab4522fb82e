"""The review page's correction tools: tool buttons and sizes, the wand's preview, the page-wide keyboard
and the help panel. Widgets only; the geometry is :class:`~slideloop_apps.editing.Editor`'s."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import ipywidgets as w
from ipyleaflet import GeoJSON, Map
from shapely.geometry import mapping
from shapely.geometry.base import BaseGeometry

from al_core.errors import SlideloopError
from al_core.project.label_edits import Combine
from slideloop_apps.editing import Editor, level0_per_screen_px, screen_to_slide, slide_to_offset
from slideloop_apps.keys import KEYMAP, help_html
from slideloop_apps.map_tools import MapTools
from slideloop_apps.state import ACCEPT, AppState

_TOOL_BUTTONS = [("Pan", "pan"), ("Brush", "brush"), ("Eraser", "eraser"), ("Wand", "wand"),
                 ("Accept", "accept"), ("Select", "select")]
_TOOL_TIPS = ["Esc: drag the map", "b: paint the active class", "e: paint background",
              "w: click a region (Shift adds, Alt subtracts)", "c: take the prediction where you paint",
              "v: pick a saved polygon (drag vertices, 1–9 class, Delete)"]
#: stroke colours of the tools without a class (colour-blind-safe Okabe–Ito)
ERASE_COLOUR, ACCEPT_COLOUR, SELECT_COLOUR = "#ffffff", "#009e73", "#f0e442"


class ToolPanel(w.VBox):
    """Tools for one map and state; ``actions`` are the page's own (next, save, toggles…) keyed by action."""

    def __init__(self, state: AppState, map_: Map, actions: dict[str, Callable[[], Any]], **kwargs: Any) -> None:
        self.state, self.map, self.actions = state, map_, actions
        self.editor = Editor(state)
        self.tools = MapTools()
        self.tools.on_event(self._on_event)
        self.tool_picker = w.ToggleButtons(options=_TOOL_BUTTONS, value="pan", tooltips=_TOOL_TIPS,
                                           style={"button_width": "56px"}).add_class("slideloop-tool")
        half = w.Layout(width="196px")
        self.radius = w.FloatSlider(self.editor.radius_um, min=2, max=120, step=1, description="Brush",
                                    tooltip="brush radius, µm ([ and ])",
                                    readout_format=".0f", layout=half, style={"description_width": "44px"})
        self.radius.add_class("slideloop-radius")
        self.tolerance = w.FloatSlider(self.editor.tolerance, min=2, max=40, step=1, description="Wand",
                                       tooltip="wand tolerance, ΔE in Lab (- and =)",
                                       readout_format=".0f", layout=half, style={"description_width": "44px"})
        self.tolerance.add_class("slideloop-tolerance")
        self.auto = w.Checkbox(True, description="Next patch after Save", indent=False,
                               layout=w.Layout(width="190px"))
        self.auto.add_class("slideloop-auto")
        self.help = w.HTML(help_html(), layout=w.Layout(display="none")).add_class("slideloop-help-panel")
        self.preview = GeoJSON(data=_features([]), name="Wand selection",
                               style={"color": SELECT_COLOUR, "weight": 3, "dashArray": "5 4", "fillOpacity": 0.15})
        map_.add(self.preview)
        super().__init__([self.tool_picker, w.HBox([self.radius, self.tolerance]), w.HBox([self.auto, self.tools]),
                          self.help], **kwargs)

        self.tool_picker.observe(lambda ch: self.editor.set_tool(ch["new"]), names="value")
        w.link((self.radius, "value"), (self.editor, "radius_um"))
        w.link((self.tolerance, "value"), (self.editor, "tolerance"))
        w.link((self.auto, "value"), (state, "auto_advance"))
        self.editor.observe(self._sync_tools, names=["tool", "radius_um", "tolerance"])
        self.editor.observe(self._show_selection, names=["selection", "picked"])
        state.observe(self._sync_tools, names=["mode"])
        map_.observe(self._sync_tools, names="zoom")
        map_.observe(self._sync_handles, names=["zoom", "center"])
        state.auto_advance = self.auto.value
        self._sync_tools()

    # --- editor → widgets ------------------------------------------------------------------------------
    def _sync_tools(self, _: Any = None) -> None:
        ed, st = self.editor, self.state
        self.tool_picker.value = ed.tool
        self.tools.tool = ed.tool
        mpp = st.mpp() or 1.0
        self.tools.radius_px = max(1.0, ed.radius_um / mpp / level0_per_screen_px(st.pyramid(), self.map.zoom))
        colours = {c.idx: c.color for c in st.classes()}
        self.tools.colour = {"eraser": ERASE_COLOUR, "accept": ACCEPT_COLOUR}.get(ed.tool,
                                                                                 colours.get(st.mode, "#0072b2"))
        name = "background" if st.mode == 0 else next((c.name for c in st.classes() if c.idx == st.mode), "?")
        self.tools.status = f"{ed.tool} · {name} · {ed.radius_um:g} µm · ? keys"

    def _show_selection(self, _: Any = None) -> None:
        ed, pyr = self.editor, self.state.pyramid()
        geoms: list[BaseGeometry] = [] if ed.selection is None else [ed.selection]
        if ed.picked is not None:
            geoms += [a.geometry for a in self.state.project.annotations(self.state.slide_id) if a.id == ed.picked]
        self.preview.data = _features([pyr.geometry_to_map(g) for g in geoms])
        self._sync_handles()

    def _sync_handles(self, _: Any = None) -> None:
        pyr, centre, zoom = self.state.pyramid(), cast(list[float], self.map.center), float(self.map.zoom)
        handles = [list(slide_to_offset(pyr, centre, zoom, x, y)) for x, y in self.editor.editable_vertices()]
        if handles != self.tools.handles:
            self.tools.handles = handles

    # --- browser → editor ------------------------------------------------------------------------------
    def _on_event(self, msg: dict[str, Any]) -> None:
        try:
            if msg.get("kind") == "key":
                self.key(str(msg["key"]))
            elif msg.get("kind") == "stroke":
                pts = [self._slide_point(p, msg["size"]) for p in msg["points"]]
                self.editor.stroke(pts)
            elif msg.get("kind") == "click":
                self._click(msg)
            elif msg.get("kind") == "vertex":
                x, y = self._slide_point(msg.get("point", [0.0, 0.0]), msg["size"])
                self.editor.edit_vertex(str(msg["op"]), int(msg["index"]), x, y)
        except SlideloopError as err:
            self.state.say(str(err), "error")

    def _slide_point(self, point: list[float], size: list[float]) -> tuple[float, float]:
        return screen_to_slide(self.state.pyramid(), cast(list[float], self.map.center), float(self.map.zoom),
                               size, point)

    def _click(self, msg: dict[str, Any]) -> None:
        x, y = self._slide_point(msg["point"], msg["size"])
        if self.editor.tool == "wand":
            how: Combine = "add" if msg.get("shift") else ("subtract" if msg.get("alt") else "replace")
            self.editor.wand(x, y, level0_per_screen_px(self.state.pyramid(), self.map.zoom), how)
        elif self.editor.tool == "select":
            self.editor.pick(x, y)

    def key(self, key: str) -> None:
        """Do what ``key`` does (see :data:`slideloop_apps.keys.KEYS`)."""
        action = KEYMAP.get(key)
        ed, st = self.editor, self.state
        if action is None:
            return
        if action.startswith("tool:"):
            ed.set_tool(action.removeprefix("tool:"))
        elif action == "class":
            idx = int(key)
            if ed.picked is not None:
                ed.edit_picked(class_idx=idx)
            elif idx in {c.idx for c in st.classes()}:
                st.mode = idx
                if ed.tool in ("pan", "eraser", "accept", "select"):
                    ed.tool = "brush"
                st.say(f"Drawing as {next(c.name for c in st.classes() if c.idx == idx)} with the {ed.tool}.")
        elif action == "size":
            ed.resize(+1 if key == "]" else -1)
        elif action == "tolerance":
            ed.tolerance = min(40.0, max(2.0, ed.tolerance + (2 if key == "=" else -2)))
            st.say(f"Wand tolerance ΔE {ed.tolerance:g}.")
        elif action == "escape":
            ed.clear()
            ed.set_tool("pan")
        elif action == "delete":
            ed.edit_picked(delete=True)
        elif action == "save":
            ed.apply()
            self.actions["save"]()
        elif action == "undo" and st.pending:
            st.undo()
        elif action == "undo":
            st.undo_saved()
        elif action == "redo":
            st.undo_saved(redo=True)
        elif action == "help":
            self.help.layout.display = None if self.help.layout.display == "none" else "none"
        elif action in self.actions:
            self.actions[action]()


def _features(geoms: list[BaseGeometry]) -> dict[str, Any]:
    return {"type": "FeatureCollection",
            "features": [{"type": "Feature", "properties": {}, "geometry": mapping(g)} for g in geoms]}


__all__ = ["ACCEPT", "ToolPanel"]
