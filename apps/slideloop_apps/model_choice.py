"""Which model ranks the queue: the Review tab's switcher and the Train tab's "kept back" comparison.

Both read and change the project's active model (:meth:`al_core.project.models.ModelVersions.activate`); a
user's pick is recorded as chosen, not as the validation set's verdict. No decisions are made here: the core
promotes or keeps back a new version (:mod:`al_core.learn.promote`), these widgets show it and let a user
overrule it.
"""

from __future__ import annotations

import html
import json
from typing import Any

import ipywidgets as w

from al_core.project.schema import ModelRow
from slideloop_apps.state import AppState


def evaluation_of(row: ModelRow) -> dict[str, Any]:
    """The stored comparison of a model version with the model active before it (empty if none)."""
    ev = json.loads(row.metrics or "{}").get("evaluation")
    return ev if isinstance(ev, dict) else {}


def use_model(state: AppState, model_id: int) -> None:
    """Make ``model_id`` the project's active model (a user's choice) and let it rank the queue."""
    state.project.models.activate(model_id, by=state.author, reason=f"chosen by {state.author} in the app",
                                  chosen=True)
    state.use_model(model_id)
    state.say(f"Model {model_id} ranks the queue now (your choice).", "ok")


class ModelSwitcher(w.HBox):
    """The Review tab's "Ranking model" picker: every finished version, the active one marked."""

    def __init__(self, state: AppState, **kwargs: Any) -> None:
        self.state = state
        self.picker = w.Dropdown(description="Ranking model", layout=w.Layout(width="100%"),
                                 style={"description_width": "110px"}).add_class("slideloop-model-pick")
        self._syncing = False
        super().__init__([self.picker], **kwargs)
        self.add_class("slideloop-model-switch")
        self.refresh()
        self.picker.observe(self._on_pick, names="value")
        state.observe(lambda _: self.refresh(), names="model_revision")

    def refresh(self) -> None:
        """Options from the store; the value is the model that ranks the queue now."""
        active = self.state.project.models.active()
        options = []
        for r in reversed(self.state.project.models.list()):
            if r.status != "done" or r.checkpoint is None:
                continue
            ev = evaluation_of(r)
            tag = " · active" if active is not None and r.id == active.id else (
                " · kept back" if ev and not ev.get("promoted") else "")
            score = f" · val IoU {ev['score']:.3f}" if isinstance(ev.get("score"), float) else ""
            options.append((f"model {r.id}{score}{tag}", r.id))
        self._syncing = True
        try:
            self.picker.options = options
            ids = [v for _, v in options]
            self.picker.value = self.state.model_id if self.state.model_id in ids else None
            self.picker.disabled = not options
        finally:
            self._syncing = False

    def _on_pick(self, change: dict[str, Any]) -> None:
        if self._syncing or change["new"] is None or change["new"] == self.state.model_id:
            return
        use_model(self.state, int(change["new"]))


class KeptBack(w.VBox):
    """The Train tab's view of the newest version when it was kept back: it and the active model side by side
    on the same validation patches, why, and "Use it anyway"."""

    def __init__(self, state: AppState, **kwargs: Any) -> None:
        self.state = state
        self.table = w.HTML().add_class("slideloop-kept-back")
        self.use_btn = w.Button(description="Use it anyway", icon="exchange",
                                tooltip="Make this version active although it scored lower")
        self.use_btn.add_class("slideloop-use-anyway")
        self._model: int | None = None
        super().__init__([self.table, self.use_btn], **kwargs)
        self.use_btn.on_click(lambda _: self._use())
        self.refresh()

    def refresh(self) -> None:
        """Show the newest finished version if it was kept back and is still not active; else nothing."""
        done = [r for r in self.state.project.models.list() if r.status == "done"]
        active = self.state.project.models.active()
        newest = done[-1] if done else None
        ev = evaluation_of(newest) if newest else {}
        if newest is None or not ev or ev.get("promoted") or (active is not None and active.id == newest.id):
            self._model = None
            self.layout.display = "none"
            return
        self._model = newest.id
        self.layout.display = ""
        value = _side_by_side(newest.id, ev)
        if self.table.value != value:
            self.table.value = value

    def _use(self) -> None:
        if self._model is not None:
            use_model(self.state, self._model)
        self.refresh()


def _side_by_side(model_id: int, ev: dict[str, Any]) -> str:
    def num(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else "–"

    other = ev.get("active_id")
    return (f"<h4>Model {model_id} was kept back</h4>"
            f"<div style='color:#6b4a00'>{html.escape(str(ev.get('reason', '')))}</div>"
            "<table><tr><th style='text-align:left'>on the same validation patches</th>"
            f"<th>model {model_id} (new)</th><th>model {other} (active)</th></tr>"
            f"<tr><td style='text-align:left'>val IoU</td><td>{num(ev.get('score'))}</td>"
            f"<td>{num(ev.get('active_score'))}</td></tr>"
            f"<tr><td style='text-align:left'>patches</td><td colspan='2'>{ev.get('patches')}</td></tr>"
            f"<tr><td style='text-align:left'>tolerance</td><td colspan='2'>{ev.get('tolerance')}</td></tr></table>")
