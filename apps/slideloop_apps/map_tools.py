"""The review map's browser side: a small anywidget that listens to keys on the whole page and lays a canvas
over the Leaflet map for the brush, eraser, accept brush and wand.

Leaflet has no brush, and leaflet-geoman's freehand draws outlines, not strokes of a width; a canvas that
reports the stroke's screen points lets the kernel buffer them with shapely at a size in µm, so the saved
label is vector geometry and the stroke never goes through a raster. anywidget keeps this to one ES module
(``_data/map_tools.js``) with no build step, and it renders in Voilà like any other widget.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anywidget
from traitlets import Bool, Float, List, Unicode

from slideloop_apps import DATA_DIR
from slideloop_apps.keys import KEYMAP


class MapTools(anywidget.AnyWidget):
    """Keys anywhere on the page and pointer strokes/clicks over the map, sent to the kernel as messages:
    ``{"kind": "key", "key": ...}``, ``{"kind": "stroke", "points": [[x, y], ...], "size": [w, h], ...}`` and
    ``{"kind": "click", "point": [x, y], "size": [w, h], "shift": ..., "alt": ...}`` and ``{"kind": "vertex",
    "op": "move" | "insert" | "delete", "index": i, "point": [x, y], "size": [w, h]}`` (map container px)."""

    _esm = DATA_DIR / "map_tools.js"
    tool = Unicode("pan").tag(sync=True)
    #: brush radius on screen, px
    radius_px = Float(10.0).tag(sync=True)
    colour = Unicode("#0072b2").tag(sync=True)
    status = Unicode("").tag(sync=True)
    keys_enabled = Bool(True).tag(sync=True)
    keymap = List(Unicode(), list(KEYMAP)).tag(sync=True)
    map_selector = Unicode(".slideloop-map .leaflet-container").tag(sync=True)
    #: the picked polygon's vertices, screen px from the map container's centre (empty: no handles)
    handles = List(List(Float()), []).tag(sync=True)

    def on_event(self, callback: Callable[[dict[str, Any]], None]) -> None:
        """Call ``callback(message)`` for every key, stroke and click the page sends."""
        self.on_msg(lambda _w, content, _buffers: callback(dict(content)))
