"""The deployment view's widgets: pick a pushed model and a slide (or upload one), run, watch the progress, see
the class map over the slide, the stage timing table and the downloads.

Widgets only lay out controls and forward events to :class:`~slideloop_apps.deploy_state.DeployState`, which
calls :mod:`al_core`. The run's progress arrives from a background thread through the state's traits. CSS
classes ``slideloop-*`` name the controls for the browser tests.
"""

from __future__ import annotations

import html
from typing import Any

import ipywidgets as w
from ipyleaflet import LayersControl, LegendControl, Map, TileLayer, WidgetControl, projections

from al_core.errors import SlideloopError
from slideloop_apps.deploy_state import STAGE_LABELS, DeployState
from slideloop_apps.state import ZOOM_SNAP, fit_zoom
from slideloop_apps.ui import message_html, scale_bar_html

MAP_HEIGHT = "660px"
_CSS = """<style>
.slideloop-title { font-size: 18px; font-weight: 600; }
.slideloop-panel h4 { margin: 12px 0 4px 0; }
.slideloop-timings table { border-collapse: collapse; font-size: 13px; width: 100%; }
.slideloop-timings td, .slideloop-timings th { padding: 1px 6px; line-height: 18px; border-bottom: 1px solid #e3e3e3; }
.slideloop-timings th { text-align: left; }
.slideloop-timings td.num, .slideloop-timings th.num { text-align: right; font-variant-numeric: tabular-nums; }
.slideloop-timings tr.total td { font-weight: 600; border-top: 2px solid #999; }
.slideloop-downloads a { display: inline-block; margin: 2px 10px 2px 0; padding: 4px 10px; border-radius: 3px;
  background: #1976d2; color: #fff !important; text-decoration: none; font-size: 13px; }
.slideloop-note { color: #555; font-size: 12px; line-height: 16px; }
</style>"""


class DeployApp(w.VBox):
    """The whole deployment view for one :class:`DeployState`."""

    def __init__(self, state: DeployState, **kwargs: Any) -> None:
        self.state = state
        self._slide_layer: TileLayer | None = None
        self._result_layer: TileLayer | None = None
        self._syncing = False

        self.message = w.HTML().add_class("slideloop-message")
        self.map = Map(crs=projections.Simple, layers=(), center=(0, 0), zoom=0, min_zoom=0,
                       scroll_wheel_zoom=True, attribution_control=False, zoom_snap=ZOOM_SNAP, zoom_delta=0.5,
                       layout=w.Layout(height=MAP_HEIGHT, flex="1 1 auto"))
        self.map.add_class("slideloop-map")
        self.scale = w.HTML().add_class("slideloop-scale")
        self.legend = LegendControl({}, title="Result", position="bottomright")
        self.map.add(LayersControl(position="topright"))
        self.map.add(WidgetControl(widget=self.scale, position="bottomleft"))
        self.map.observe(self._on_zoom, names="zoom")

        # right panel -------------------------------------------------------------------------------
        full = w.Layout(width="370px")
        narrow = {"description_width": "56px"}
        self.model_picker = w.Dropdown(description="Model", layout=full, style=narrow)
        self.model_picker.add_class("slideloop-deploy-model")
        self.model_note = w.HTML().add_class("slideloop-model-note")
        self.slide_picker = w.Dropdown(description="Slide", layout=full, style=narrow)
        self.slide_picker.add_class("slideloop-deploy-slide")
        self.upload = w.FileUpload(accept=",".join(_upload_types()), multiple=False,
                                   # it reads "Upload slide (0)" beside its icon; the note beside it shrank
                                   # the 140 px asked for to 111 and cut it to "Uploa…": a fixed width
                                   description="Upload slide", layout=w.Layout(width="170px", min_width="170px"))
        self.upload.add_class("slideloop-upload")
        self.run_btn = w.Button(description="Run", icon="play", button_style="primary",
                                layout=w.Layout(width="120px")).add_class("slideloop-run")
        self.progress = w.IntProgress(value=0, min=0, max=1, layout=w.Layout(width="370px"))
        self.progress.add_class("slideloop-progress")
        self.progress_text = w.HTML().add_class("slideloop-progress-text")
        self.run_picker = w.Dropdown(description="Shown", layout=full, style=narrow).add_class("slideloop-runs")
        self.opacity = w.FloatSlider(0.7, min=0, max=1, step=0.05, description="Opacity", readout_format=".0%",
                                     style=narrow, layout=full)
        self.timings = w.HTML().add_class("slideloop-timings")
        self.downloads = w.HTML().add_class("slideloop-downloads")

        panel = w.VBox([
            w.HTML("<h4>Model</h4>"), self.model_picker, self.model_note,
            w.HTML("<h4>Slide</h4>"), self.slide_picker,
            w.HBox([self.upload, w.HTML("<div class='slideloop-note' style='padding:4px 8px'>adds a slide file "
                                        "to the project (small files; large ones with 'slideloop add')</div>")]),
            w.HBox([self.run_btn], layout=w.Layout(margin="10px 0 4px 0")), self.progress, self.progress_text,
            w.HTML("<h4>Result</h4>"), self.run_picker, self.opacity, self.downloads, self.timings,
        ], layout=w.Layout(width="390px", min_width="390px", padding="0 0 0 12px")).add_class("slideloop-panel")
        title = w.HTML(f"{_CSS}<div class='slideloop-title'>slideloop · deploy "
                       f"<span style='font-weight:400;color:#555'>{html.escape(state.project.root.name)}</span></div>")
        super().__init__([title, self.message, w.HBox([self.map, panel])], **kwargs)

        # wiring --------------------------------------------------------------------------------------
        self.model_picker.observe(self._on_model_pick, names="value")
        self.slide_picker.observe(self._on_slide_pick, names="value")
        self.run_picker.observe(self._on_run_pick, names="value")
        self.upload.observe(self._on_upload, names="value")
        self.run_btn.on_click(lambda _: self._guard(state.start))
        state.observe(self._show_message, names=["message", "level"])
        state.observe(lambda _: self._show_slide(), names="slide_id")
        state.observe(lambda _: self._show_result(), names="run_id")
        state.observe(lambda _: self._show_progress(), names=["done", "total", "running"])
        state.observe(lambda _: self._show_choices(), names="revision")

        self._show_choices()
        self._show_slide()
        self._show_progress()
        if not state.models():
            state.say("No model is pushed to this project yet: export one and push it "
                      "('slideloop export PROJECT -o model.onnx', then 'slideloop push PROJECT model.onnx').", "warning")
        elif not state.slide_choices():
            state.say("The project has no slides yet: upload one on the right, or add one with 'slideloop add'.",
                      "warning")
        else:
            state.say("Pick a model and a slide, then Run. The result appears over the slide.")
        self._show_message()

    # --- state → widgets ---------------------------------------------------------------------------
    def _show_message(self, _: Any = None) -> None:
        self.message.value = message_html(self.state.message, self.state.level)

    def _show_choices(self) -> None:
        st = self.state
        self._syncing = True
        try:
            self.model_picker.options = st.model_choices()
            self.model_picker.value = st.model_name or None
            self.slide_picker.options = st.slide_choices()
            self.slide_picker.value = st.slide_id or None
            self.run_picker.options = [("—", ""), *st.run_choices()]
            self.run_picker.value = st.run_id
        finally:
            self._syncing = False
        self.model_note.value = f"<div class='slideloop-note'>{html.escape(st.model_summary())}</div>"
        self.run_btn.disabled = st.running or not st.model_name or not st.slide_id

    def _show_slide(self) -> None:
        st = self.state
        if not st.slide_id:
            return
        pyr = st.pyramid()
        if self._slide_layer is not None and self._slide_layer in self.map.layers:
            self.map.remove(self._slide_layer)
        self._slide_layer = TileLayer(url=st.tile_urls()["slide"], name="Slide", base=True, **_layer_opts(pyr))
        self.map.add(self._slide_layer)
        bounds = pyr.bounds()
        self.map.max_zoom = pyr.zmax + 2
        self.map.center = ((bounds[0][0] + bounds[1][0]) / 2, (bounds[0][1] + bounds[1][1]) / 2)
        self.map.zoom = fit_zoom(pyr, max(pyr.width, pyr.height), 620)
        self._show_choices()
        self._show_result()
        self._on_zoom()

    def _show_result(self) -> None:
        st = self.state
        if self._result_layer is not None and self._result_layer in self.map.layers:
            self.map.remove(self._result_layer)
        self._result_layer = None
        if self.legend in self.map.controls:
            self.map.remove(self.legend)
        urls = st.tile_urls()
        res = st.result
        if "result" in urls:
            self._result_layer = TileLayer(url=urls["result"], name=f"Result · {res.get('model', '')}",
                                           opacity=self.opacity.value, **_layer_opts(st.pyramid()))
            self.map.add(self._result_layer)
            w.jslink((self.opacity, "value"), (self._result_layer, "opacity"))
            legend = {c["name"]: c["color"] for c in res.get("classes", [])
                      if isinstance(c, dict) and str(c.get("name", "")).lower() != "background"}
            if legend:
                self.legend.legend = legend
                self.map.add(self.legend)
        self._syncing = True
        try:
            self.run_picker.options = [("—", ""), *st.run_choices()]
            self.run_picker.value = st.run_id
        finally:
            self._syncing = False
        self.opacity.disabled = not st.run_id
        self.timings.value = _timing_table(res) if st.run_id else (
            "<div class='slideloop-note'>No result for this slide yet.</div>")
        links = st.download_urls()
        labels = {"tiff": "Class map (TIFF)", "geojson": "Polygons (GeoJSON)", "report": "Report (JSON)"}
        self.downloads.value = "".join(
            f"<a class='slideloop-download-{k}' href='{html.escape(url)}' download='{html.escape(name)}' "
            f"title='{html.escape(name)}'>⬇ {labels[k]}</a>" for k, (url, name) in links.items())

    def _show_progress(self) -> None:
        st = self.state
        self.run_btn.disabled = st.running or not st.model_name or not st.slide_id
        self.run_btn.description = "Running…" if st.running else "Run"
        self.progress.max = max(1, st.total)
        self.progress.value = min(st.done, self.progress.max)
        self.progress.bar_style = "info" if st.running else ("success" if st.total and st.done >= st.total else "")
        if st.running and not st.total:
            text = "Finding tissue and building the patch grid…"
        elif st.total:
            text = f"{st.done} / {st.total} patches" + ("" if st.running else " · finished")
        else:
            text = ""
        self.progress_text.value = f"<div class='slideloop-note'>{html.escape(text)}</div>"

    def _on_zoom(self, _: Any = None) -> None:
        st = self.state
        if not st.slide_id:
            return
        pyr = st.pyramid()
        px_per_screen = 2.0 ** (pyr.zmax - self.map.zoom)
        self.scale.value = scale_bar_html(st.project.slide_row(st.slide_id).mpp, px_per_screen)

    # --- widgets → state ---------------------------------------------------------------------------
    def _guard(self, fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except SlideloopError as err:
            self.state.say(str(err), "error")

    def _on_model_pick(self, change: dict[str, Any]) -> None:
        if self._syncing or change["new"] is None:
            return
        self.state.model_name = change["new"]
        self.model_note.value = f"<div class='slideloop-note'>{html.escape(self.state.model_summary())}</div>"

    def _on_slide_pick(self, change: dict[str, Any]) -> None:
        if not self._syncing and change["new"] is not None:
            self._guard(self.state.select_slide, int(change["new"]))

    def _on_run_pick(self, change: dict[str, Any]) -> None:
        if not self._syncing and change["new"] is not None:
            self._guard(self.state.show_run, change["new"])

    def _on_upload(self, change: dict[str, Any]) -> None:
        files = change["new"]
        if not files:
            return
        f = files[0]
        self.state.say(f"Adding {f['name']} to the project (reading it and finding its tissue)…")
        try:
            self.state.add_upload(f["name"], bytes(f["content"]))
        except SlideloopError as err:
            self.state.say(f"Cannot add {f['name']}: {err}", "error")
        finally:
            self.upload.value = ()


def _layer_opts(pyr: Any) -> dict[str, Any]:
    return dict(bounds=pyr.bounds(), max_native_zoom=pyr.zmax, max_zoom=pyr.zmax + 2, min_zoom=0, no_wrap=True,
                tile_size=256, attribution="")


def _upload_types() -> list[str]:
    from al_core.project.uploads import SLIDE_SUFFIXES

    return list(SLIDE_SUFFIXES)


def _timing_table(res: dict[str, Any]) -> str:
    """The run's stage timings (FastPathology's Table 2 layout), its patch count and class areas, as HTML."""
    t = res.get("timings", {})
    total = t.get("total") or 0.0
    rows = []
    for key, label in STAGE_LABELS:
        if key not in t:
            continue
        sec = float(t[key])
        share = f"{100 * sec / total:.0f} %" if total and key != "total" else ""
        cls = " class='total'" if key == "total" else ""
        rows.append(f"<tr{cls}><td>{label}</td><td class='num'>{sec:.2f}</td><td class='num'>{share}</td></tr>")
    mpp = res.get("model_mpp")
    pixels = res.get("class_pixels", {})
    counted = sum(pixels.values()) or 1
    areas = []
    for name, n in pixels.items():
        if name.lower() == "background":
            continue
        size = f"{n * mpp * mpp / 1e6:.2f} mm²" if mpp else f"{n} px"
        areas.append(f"{html.escape(name)}: {size} ({100 * n / counted:.1f} % of the slide)")
    providers = ", ".join(p.removesuffix("ExecutionProvider") for p in res.get("providers", []))
    return (f"<table><tr><th>Stage</th><th class='num'>seconds</th><th class='num'>of total</th></tr>"
            f"{''.join(rows)}</table>"
            f"<div class='slideloop-note' style='margin-top:4px'>{res.get('patches', 0)} tissue patches of "
            f"{res.get('patches_total', 0)} · {html.escape(providers)} · stages overlap, so they can add up to more "
            f"than the total</div>"
            + (f"<div style='margin-top:4px;font-size:13px'>{'<br>'.join(areas)}</div>" if areas else ""))


def build_app() -> w.Widget:
    """The view for the project in ``SLIDELOOP_PROJECT``, or a clear message when it cannot be opened."""
    try:
        return DeployApp(DeployState.from_env())
    except SlideloopError as err:
        return w.HTML(f"<div style='color:#8a1010;background:#fde8e8;padding:10px;border-left:4px solid #8a1010'>"
                      f"<b>slideloop cannot open the project.</b><br>{html.escape(str(err))}</div>")
