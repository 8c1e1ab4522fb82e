"""The review app's widgets: a slide map with overlays, the review queue and the correction tools.

Widgets here only lay out controls and forward events to :class:`~slideloop_apps.state.AppState`, which calls
:mod:`al_core`. CSS classes ``slideloop-*`` name the controls for the browser tests.
"""

from __future__ import annotations

import html
import logging
from typing import Any

import ipywidgets as w
from ipyleaflet import (
    DrawControl,
    GeoJSON,
    LayersControl,
    LegendControl,
    Map,
    TileLayer,
    WidgetControl,
    projections,
)
from shapely.geometry import mapping

from al_core.errors import SlideloopError
from slideloop_apps.model_choice import ModelSwitcher
from slideloop_apps.review_tools import ACCEPT_COLOUR, ERASE_COLOUR, ToolPanel
from slideloop_apps.run_follower import RunFollower
from slideloop_apps.state import ACCEPT, ZOOM_SNAP, AppState, QueueItem, fit_zoom, patch_center, patch_outline
from slideloop_apps.ui import message_html, scale_bar_html

log = logging.getLogger(__name__)

#: the map fills the window's height below the title and message (at 1280×800 the queue must stay on screen)
MAP_HEIGHT = "max(420px, calc(100vh - 190px))"
#: characters of the slide name in a queue row
_NAME = 20
_CSS = """<style>
.slideloop-queue select { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 12px; }
.slideloop-title { font-size: 18px; font-weight: 600; }
.slideloop-panel h4 { margin: 8px 0 2px 0; }
.slideloop-model div { font-size: 12px; line-height: 1.35; }
.slideloop-tool button, .slideloop-mode button { padding: 0 4px; font-size: 12px; }
.slideloop-tools-status { font: 12px ui-monospace, Menlo, Consolas, monospace; color: #333; margin: 2px 0; }
</style>"""


_LEGEND = ("<div style='color:#555;font-size:12px;line-height:1.4'>Labels: class outline, light fill · "
           "prediction: dashed outline · errors (m): <span style='background:#e69f00;padding:0 4px'>false positive"
           "</span> <span style='background:#56b4e9;padding:0 4px'>false negative</span></div>")


class ReviewApp(w.VBox):
    """The whole review dashboard for one :class:`AppState`."""

    def __init__(self, state: AppState, **kwargs: Any) -> None:
        self.state = state
        self._layers: dict[str, TileLayer] = {}
        #: which overlays are on (keys l, o, m); a layer that is off is not on the map, so it fetches nothing
        self._shown = {"labels": True, "prediction": True, "errors": False}
        self._syncing = False
        classes = [c for c in state.classes() if c.idx > 0]

        # room for two lines of message: a longer one must not push the map down under the reviewer's mouse
        self.message = w.HTML(layout=w.Layout(min_height="76px")).add_class("slideloop-message")
        self.map = Map(crs=projections.Simple, layers=(), center=(0, 0), zoom=0, min_zoom=0,
                       scroll_wheel_zoom=True, attribution_control=False, zoom_snap=ZOOM_SNAP, zoom_delta=0.5,
                       layout=w.Layout(height=MAP_HEIGHT, flex="1 1 auto"))
        self.map.add_class("slideloop-map")
        self.outline = GeoJSON(data=patch_outline([], state.pyramid()), name="Current patch",
                               style={"color": "#ffd400", "weight": 3, "fill": False, "dashArray": "6 4"})
        self.pending = GeoJSON(data={"type": "FeatureCollection", "features": []}, name="Unsaved shapes",
                               style={"weight": 2, "fillOpacity": 0.35})
        self.draw = DrawControl(
            polygon={"shapeOptions": {"color": "#00a0ff", "weight": 2}},
            rectangle={"shapeOptions": {"color": "#00a0ff", "weight": 2}},
            polyline={}, circle={}, circlemarker={}, marker={}, edit=False, remove=False,
        )
        self.draw.on_draw(self._on_draw)
        self.scale = w.HTML().add_class("slideloop-scale")
        self.legend = LegendControl({c.name: c.color for c in classes}, title="Classes", position="bottomright")
        for control in (LayersControl(position="topright"), self.draw, self.legend,
                        WidgetControl(widget=self.scale, position="bottomleft")):
            self.map.add(control)
        self.map.observe(self._on_zoom, names="zoom")

        # right panel -------------------------------------------------------------------------------
        self.slide_picker = w.Dropdown(options=state.slide_choices(), value=state.slide_id, description="Slide",
                                       layout=w.Layout(width="100%")).add_class("slideloop-slide")
        self.model_note = w.HTML().add_class("slideloop-model")
        self.model_switch = ModelSwitcher(state)  # which model ranks the queue; any version and back
        self.label_opacity = _opacity(0.9, "slideloop-label-opacity")
        self.pred_opacity = _opacity(0.35, "slideloop-pred-opacity")
        self.error_opacity = _opacity(0.8, "slideloop-error-opacity")
        self.contours = GeoJSON(data={"type": "FeatureCollection", "features": []}, name="Prediction outline",
                                style={"weight": 2, "fill": False, "dashArray": "6 4", "opacity": 0.95})
        self.mode = w.ToggleButtons(options=[(f"{i} {c.name}" if i < 10 else c.name, c.idx)
                                             for i, c in enumerate(classes, 1)] + [("Erase", 0)],
                                    value=state.mode, tooltips=[f"key {c.idx}" for c in classes] + ["key e"],
                                    style={"button_width": "auto"}).add_class("slideloop-mode")
        self.undo_btn = w.Button(description="Undo", icon="undo", tooltip="Ctrl+Z: the last unsaved shape, else "
                                 "the last saved edit").add_class("slideloop-undo")
        self.redo_btn = w.Button(description="Redo", icon="repeat", tooltip="Ctrl+Shift+Z").add_class("slideloop-redo")
        self.save_btn = w.Button(description="Save", icon="save", button_style="primary").add_class("slideloop-save")
        self.accept_btn = w.Button(description="Accept", icon="check", layout=w.Layout(width="94px"),
                                   tooltip="a: the model's prediction becomes this patch's label (the Accept "
                                           "brush, c, takes it only where you paint)")
        self.accept_btn.add_class("slideloop-accept")
        self.queue = w.Select(options=[], rows=10, layout=w.Layout(width="100%")).add_class("slideloop-queue")
        self.prev_btn = w.Button(description="Previous", icon="arrow-up").add_class("slideloop-prev")
        self.next_btn = w.Button(description="Next", icon="arrow-down").add_class("slideloop-next")
        self.queue_head = w.HTML()

        self.tool_panel = ToolPanel(state, self.map, {
            "next": lambda: state.step(+1), "prev": lambda: state.step(-1), "save": state.save,
            "accept": state.accept_prediction, "toggle:labels": lambda: self.toggle_layer("labels"),
            "toggle:prediction": lambda: self.toggle_layer("prediction"),
            "toggle:errors": lambda: self.toggle_layer("errors")})
        for b in (self.undo_btn, self.redo_btn, self.save_btn):
            b.layout.width = "94px"
        opacities = w.GridBox(
            [w.HTML(f"<span style='font-size:12px'>{t}</span>") for t in ("Labels (l)", "Prediction (o)", "Errors (m)")]
            + [self.label_opacity, self.pred_opacity, self.error_opacity],
            layout=w.Layout(grid_template_columns="repeat(3, 1fr)", grid_gap="0 6px", width="100%"))
        panel = w.VBox([
            self.slide_picker, self.model_note, self.model_switch,
            w.HTML("<h4>Overlays</h4>"), opacities, w.HTML(_LEGEND),
            w.HTML("<h4>Correct</h4>"), self.mode, self.tool_panel,
            w.HBox([self.undo_btn, self.redo_btn, self.save_btn, self.accept_btn]),
            w.HTML("<h4>Review queue</h4>"), self.queue_head, self.queue, w.HBox([self.prev_btn, self.next_btn]),
        ], layout=w.Layout(width="400px", min_width="400px", padding="0 0 0 12px")).add_class("slideloop-panel")
        title = w.HTML(f"{_CSS}<div class='slideloop-title'>slideloop · review "
                       f"<span style='font-weight:400;color:#555'>{html.escape(state.project.root.name)}</span></div>")
        super().__init__([title, self.message, w.HBox([self.map, panel])], **kwargs)

        # wiring --------------------------------------------------------------------------------------
        self.slide_picker.observe(lambda ch: state.select_slide(ch["new"]), names="value")
        w.link((self.mode, "value"), (state, "mode"))  # the class keys 1–9 set it too
        self.undo_btn.on_click(lambda _: self.tool_panel.key("ctrl+z"))
        self.redo_btn.on_click(lambda _: self.tool_panel.key("ctrl+Z"))
        self.save_btn.on_click(lambda _: self.tool_panel.key("s"))
        self.accept_btn.on_click(lambda _: state.accept_prediction())
        self.prev_btn.on_click(lambda _: state.step(-1))
        self.next_btn.on_click(lambda _: state.step(+1))
        self.queue.observe(self._on_queue_pick, names="value")
        state.observe(self._show_message, names=["message", "level"])
        state.observe(lambda _: self._show_slide(), names="slide_id")
        state.observe(lambda _: self._show_patch(), names="patch_id")
        state.observe(lambda _: self._show_queue(), names="queue")
        state.observe(lambda _: self._show_pending(), names="pending")
        state.observe(lambda _: self._refresh_overlays(), names="revision")
        state.observe(lambda _: self._show_model(), names="model_revision")

        self._show_slide()
        self._show_queue()
        self._show_message()
        problem = state.slide_problem()
        if problem:
            state.say(problem, "error")
        else:
            state.say("Pick a patch in the queue (n / p step through it from anywhere on the page), paint with the "
                      "brush (b) or click with the wand (w), then Save (s); ? lists the keys.")

    # --- state → widgets ---------------------------------------------------------------------------
    def _show_message(self, _: Any = None) -> None:
        self.message.value = message_html(self.state.message, self.state.level)

    def _show_slide(self) -> None:
        st = self.state
        pyr = st.pyramid()
        for layer in [*self._layers.values(), self.contours, self.outline, self.pending]:
            if layer in self.map.layers:
                self.map.remove(layer)
        bounds = pyr.bounds()
        opts = dict(bounds=bounds, max_native_zoom=pyr.zmax, max_zoom=pyr.zmax + 2, min_zoom=0, no_wrap=True,
                    tile_size=256, attribution="")
        urls = st.tile_urls()
        self._layers = {"slide": TileLayer(url=urls["slide"], name="Slide", base=True, **opts)}
        self._layers["labels"] = self._overlay("labels", urls["labels"])
        self._layers.update(self._model_layers(urls))
        for name, layer in self._layers.items():
            if self._shown.get(name, True):
                self.map.add(layer)
        for layer in (self.contours, self.outline, self.pending):
            self.map.add(layer)
        self._model_controls()
        self.model_note.value = f"<div style='color:#444;margin:4px 0'>{html.escape(st.model_note())}</div>"
        self.map.max_zoom = pyr.zmax + 2
        self.map.center = ((bounds[0][0] + bounds[1][0]) / 2, (bounds[0][1] + bounds[1][1]) / 2)
        self.map.zoom = fit_zoom(pyr, max(pyr.width, pyr.height), 560)
        self._syncing = True
        try:
            self.slide_picker.value = st.slide_id
        finally:
            self._syncing = False
        self.outline.data = patch_outline([], pyr)
        self._show_pending()
        self._on_zoom()

    def _show_patch(self) -> None:
        st = self.state
        self._show_contours()
        if st.patch_id is None:
            self.outline.data = patch_outline([], st.pyramid())
            return
        patch = st.project.patch(st.patch_id)
        pyr = st.pyramid()
        self.outline.data = patch_outline([patch], pyr)
        self.map.center = patch_center(patch, pyr)
        self.map.zoom = fit_zoom(pyr, patch.size, 480)
        if self.queue.value != st.patch_id:
            self._syncing = True
            try:
                self.queue.value = st.patch_id if st.patch_id in dict(self.queue.options).values() else None
            finally:
                self._syncing = False

    def _show_queue(self) -> None:
        st = self.state
        items: list[QueueItem] = st.queue
        self._syncing = True
        try:
            self.queue.options = [(_queue_label(q), q.patch_id) for q in items]
            self.queue.value = st.patch_id if any(q.patch_id == st.patch_id for q in items) else None
        finally:
            self._syncing = False
        done = sum(q.reviewed for q in items)
        self.queue_head.value = (
            "<div style='font:12px ui-monospace,Menlo,Consolas,monospace;color:#333;white-space:pre'>"
            f"{done}/{len(items)} reviewed   ✓ reviewed ● labelled ○ unlabelled"
            + ("   Δ changed since predicted" if any(q.changed for q in items) else "") + "\n"
            f"{'':3}{'slide':<{_NAME}}{'x':>6} {'y':>6}" + (f"  {'IoU':>5} {'unc':>5}" if st.has_predictions else
                                                              "   (no scores yet)") + "</div>")

    def _show_pending(self) -> None:
        st = self.state
        pyr = st.pyramid()
        colors = {c.idx: c.color for c in st.classes()}
        feats = []
        for mode, geom in st.pending:
            scaled = pyr.geometry_to_map(geom)
            color = {0: ERASE_COLOUR, ACCEPT: ACCEPT_COLOUR}.get(mode) or colors.get(mode, "#000000")
            feats.append({"type": "Feature", "geometry": mapping(scaled),
                          "properties": {"style": {"color": color, "fillColor": color,
                                                   "dashArray": "4 3" if mode == 0 else None}}})
        self.pending.data = {"type": "FeatureCollection", "features": feats}

    def toggle_layer(self, name: str) -> None:
        """Show or hide an overlay (labels, prediction, errors) without losing its opacity."""
        layer = self._layers.get(name)
        if layer is None:
            self.state.say(f"There is no {name} overlay" + (" until a model has predicted." if name != "labels" else "."))
            return
        self._shown[name] = not self._shown[name]
        if self._shown[name] and layer not in self.map.layers:
            self.map.add(layer)
        elif not self._shown[name] and layer in self.map.layers:
            self.map.remove(layer)
        self.state.say(f"{name.capitalize()} overlay {'shown' if self._shown[name] else 'hidden'}.")

    def _refresh_overlays(self) -> None:
        urls = self.state.tile_urls()
        for name in ("labels", "errors"):
            if name in self._layers and name in urls:
                self._layers[name].url = urls[name]  # a new ?v= makes Leaflet refetch every visible tile

    def _show_model(self) -> None:
        """Another model ranks the queue now (a training run finished): swap the prediction and error layers
        and the model note without moving the map."""
        for name in ("prediction", "errors"):
            old = self._layers.pop(name, None)
            if old is not None and old in self.map.layers:
                self.map.remove(old)
        for name, layer in self._model_layers(self.state.tile_urls()).items():
            self._layers[name] = layer
            if self._shown[name]:
                self.map.add(layer)
        self._model_controls()
        self._show_contours()

    _OPACITY = {"labels": "label_opacity", "prediction": "pred_opacity", "errors": "error_opacity"}
    _NAMES = {"labels": "Labels", "prediction": "Prediction", "errors": "Errors (FP orange, FN blue)"}

    def _overlay(self, name: str, url: str) -> TileLayer:
        """An overlay tile layer whose opacity follows its slider (in the browser, no round trip)."""
        pyr = self.state.pyramid()
        slider: w.FloatSlider = getattr(self, self._OPACITY[name])
        layer = TileLayer(url=url, name=self._NAMES[name], opacity=slider.value, bounds=pyr.bounds(),
                          max_native_zoom=pyr.zmax, max_zoom=pyr.zmax + 2, min_zoom=0, no_wrap=True, tile_size=256,
                          attribution="")
        w.jslink((slider, "value"), (layer, "opacity"))
        return layer

    def _model_layers(self, urls: dict[str, str]) -> dict[str, TileLayer]:
        return {name: self._overlay(name, urls[name]) for name in ("prediction", "errors") if name in urls}

    def _model_controls(self) -> None:
        no_model = "prediction" not in self._layers
        self.pred_opacity.disabled = self.error_opacity.disabled = self.accept_btn.disabled = no_model
        self.model_note.value = f"<div style='color:#444;margin:4px 0'>{html.escape(self.state.model_note())}</div>"

    def _show_contours(self) -> None:
        """The current patch's prediction as smooth dashed outlines in its class colours."""
        st = self.state
        pyr = st.pyramid()
        colors = {c.idx: c.color for c in st.classes()}
        feats = []
        for c, g in st.prediction_contours():
            geom = mapping(pyr.geometry_to_map(g))
            # a pale solid halo under the dashed class colour: the outline reads on pink and purple alike
            feats.append({"type": "Feature", "geometry": geom,
                          "properties": {"style": {"color": "#ffffff", "weight": 4, "dashArray": None,
                                                   "opacity": 0.7}}})
            feats.append({"type": "Feature", "geometry": geom,
                          "properties": {"style": {"color": colors.get(c, "#000000")}}})
        self.contours.data = {"type": "FeatureCollection", "features": feats}

    def _on_zoom(self, _: Any = None) -> None:
        st = self.state
        pyr = st.pyramid()
        px_per_screen = 2.0 ** (pyr.zmax - self.map.zoom)
        self.scale.value = scale_bar_html(st.mpp(), px_per_screen)

    # --- widgets → state ---------------------------------------------------------------------------
    def _on_queue_pick(self, change: dict[str, Any]) -> None:
        if self._syncing or change["new"] is None:
            return
        try:
            self.state.select_patch(int(change["new"]))
        except SlideloopError as err:
            self.state.say(str(err), "error")

    def _on_draw(self, target: Any, action: str, geo_json: dict[str, Any]) -> None:
        if action != "created":
            return
        self.state.add_drawn(geo_json)
        self.draw.clear()  # the shape lives on in the 'Unsaved shapes' layer, coloured by its class


def _opacity(value: float, css: str) -> w.FloatSlider:
    return w.FloatSlider(value, min=0, max=1, step=0.05, readout=False,
                         layout=w.Layout(width="100%")).add_class(css)


def _queue_label(q: QueueItem) -> str:
    mark = ("✓" if q.reviewed else ("●" if q.labelled else "○")) + ("Δ" if q.changed else " ")
    iou = "  -  " if q.iou is None else f"{q.iou:5.2f}"
    unc = "  -  " if q.uncertainty is None else f"{q.uncertainty:5.2f}"
    if q.iou is None and q.uncertainty is None:
        return f"{mark} {_short(q.slide):<{_NAME}}{q.x:>6} {q.y:>6}"
    return f"{mark} {_short(q.slide):<{_NAME}}{q.x:>6} {q.y:>6}  {iou} {unc}"


def _short(name: str) -> str:
    """A slide name in :data:`_NAME` characters, cut in the middle: the ends tell slides apart."""
    if len(name) <= _NAME:
        return name
    head = (_NAME - 2) // 2
    return f"{name[:head]}…{name[-(_NAME - 2 - head):]}"


def build_app() -> w.Widget:
    """The app for the project in ``SLIDELOOP_PROJECT`` (review and training tabs), or a clear message when it
    cannot be opened.

    The Train tab's panel is built when the tab is first opened: it is nearly half the page's widgets, and a
    reviewer's first paint should not wait for them. Finished runs reach the queue meanwhile through the
    page's :class:`RunFollower`."""
    try:
        state = AppState.from_env()
        review = ReviewApp(state)
        follower = RunFollower(state).start()
    except SlideloopError as err:
        return w.HTML(message_html(f"slideloop cannot open the project: {err}", "error"))
    train_tab = w.VBox([w.HTML(message_html("Opening the training panel…"))]).add_class("slideloop-train-tab")
    tabs = w.Tab([review, train_tab]).add_class("slideloop-tabs")
    tabs.titles = ("Review", "Train")

    built: list[w.Widget] = []

    def open_train(change: dict[str, Any]) -> None:
        if change["new"] != 1 or built:
            return
        try:
            # matplotlib is imported only for a page that opens the tab
            from slideloop_apps.train_panel import TrainPanel

            built.append(TrainPanel(state, follower=follower))
        except Exception as err:  # shown in the tab; the review side stays usable
            log.exception("the training panel failed")
            train_tab.children = (w.HTML(message_html(f"The training panel failed: {type(err).__name__}: {err}",
                                                      "error")),)
            return
        train_tab.children = tuple(built)

    tabs.observe(open_train, names="selected_index")
    return tabs
