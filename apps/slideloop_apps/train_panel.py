"""The training panel: retrain from the corrections, follow the run, and let the new model rank the queue.

Training runs on the Dask worker (:mod:`al_core.jobs`), never in this kernel. A daemon thread polls the job row
and the model rows once a second and updates the widgets (ipykernel sends widget messages from any thread), so
the dashboard stays responsive. All it shows comes from the store: reload the page, or restart the kernel, and
a run still going is shown again. A finished run's model reaches the queue through the page's
:class:`~slideloop_apps.run_follower.RunFollower`, which works whether or not the panel was ever built.
"""

from __future__ import annotations

import functools
import html
import io
import logging
import math
import threading
from typing import Any

import ipywidgets as w

from al_core.project.schema import ModelRow
from slideloop_apps.model_choice import KeptBack
from slideloop_apps.run_follower import POLL_S, RunFollower, finished_message
from slideloop_apps.state import AppState
from slideloop_apps.train_tables import instance_classes, num, objects_html, rounds_html
from slideloop_apps.training import (
    ENCODERS,
    LOWER_IS_BETTER,
    METRICS,
    NEW_MODEL_EPOCHS,
    NEW_MODEL_LR,
    RETRAIN_EPOCHS,
    RETRAIN_LR,
    RunView,
    TrainingService,
    TrainSettings,
)
from slideloop_apps.ui import message_html

log = logging.getLogger(__name__)

#: width of the widest controls (the model and encoder dropdowns)
_WIDE = "400px"
#: the "Start from" choice of a new model (a Dropdown shows nothing for None; model ids start at 1)
NEW = 0
_TABLE_CSS = ("<style>.slideloop-models table, .slideloop-compare table {border-collapse:collapse;"
              "font:12px ui-monospace,Menlo,Consolas,monospace} .slideloop-models td, .slideloop-models th,"
              ".slideloop-compare td, .slideloop-compare th {padding:2px 8px;border-bottom:1px solid #ddd;"
              "text-align:right} .slideloop-models tr.active {background:#e6f4ea;font-weight:600}"
              ".slideloop-rounds table, .slideloop-objects table {border-collapse:collapse;"
              "font:12px ui-monospace,Menlo,Consolas,monospace} .slideloop-rounds td, .slideloop-rounds th,"
              ".slideloop-objects td, .slideloop-objects th {padding:2px 8px;border-bottom:1px solid #ddd;"
              "text-align:right} .slideloop-rounds tr.active {background:#e6f4ea;font-weight:600}"
              " .slideloop-rounds .up {color:#0c5a1c} .slideloop-rounds .down {color:#8a1010}"
              " .slideloop-rounds .same {color:#666} .slideloop-objects .ci {color:#666}</style>")


class TrainPanel(w.VBox):
    """Training controls, progress, learning curves and the model versions of one :class:`AppState`."""

    def __init__(self, state: AppState, service: TrainingService | None = None, poll: bool = True,
                 follower: RunFollower | None = None, **kwargs: Any) -> None:
        self.state = state
        self.service = service or (follower.service if follower is not None else
                                   TrainingService(state.project, author=state.author))
        # the page's follower when it has one (started before the panel was built); else the panel's own
        self.follower = follower or RunFollower(state, self.service)
        self._own_follower = follower is None
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._shown: dict[str, Any] = {}  # what the widgets show now, to redraw only on change
        self._submitting = False
        self._parent_encoder = False  # the encoder box shows a parent's encoder, not the user's choice

        layout = w.Layout(width="260px")
        style = {"description_width": "110px"}
        # the model and encoder choices hold the longest texts ("model 12 (tu-mobilenetv3_small_050)"): wider
        self.from_model = w.Dropdown(options=[("new model", NEW)], value=NEW, description="Start from",
                                     layout=w.Layout(width=_WIDE), style=style).add_class("slideloop-from")
        self.encoder = w.Dropdown(options=list(ENCODERS), value=TrainSettings.encoder, description="Encoder",
                                  layout=w.Layout(width=_WIDE), style=style).add_class("slideloop-encoder")
        self.epochs = w.BoundedIntText(TrainSettings.epochs, min=1, max=500, description="Epochs", layout=layout,
                                       style=style).add_class("slideloop-epochs")
        self.batch = w.BoundedIntText(TrainSettings.batch_size, min=1, max=256, description="Batch size",
                                      layout=layout, style=style).add_class("slideloop-batch")
        self.lr = w.BoundedFloatText(TrainSettings.lr, min=1e-7, max=1.0, step=1e-4, description="Learning rate",
                                     layout=layout, style=style).add_class("slideloop-lr")
        self.max_steps = w.BoundedIntText(0, min=0, max=1_000_000, description="Max steps", layout=layout,
                                          style=style, tooltip="cap on optimizer steps over the run; 0: no cap")
        self.max_steps.add_class("slideloop-max-steps")
        self.augment = w.Checkbox(TrainSettings.augment, description="Augmentation", indent=False,
                                  layout=w.Layout(width="260px")).add_class("slideloop-augment")
        self.train_btn = w.Button(description="Train", icon="play", button_style="primary",
                                  tooltip="Train on the current labels, then predict and re-rank the queue")
        self.train_btn.add_class("slideloop-train")
        self.cancel_btn = w.Button(description="Cancel", icon="stop", disabled=True,
                                   tooltip="Stop the run; the model that ranks the queue now stays active")
        self.cancel_btn.add_class("slideloop-cancel")
        self.status = w.HTML().add_class("slideloop-train-status")
        self.progress = w.FloatProgress(0.0, min=0.0, max=1.0, description="Progress",
                                        layout=w.Layout(width="100%")).add_class("slideloop-train-progress")
        self.timing = w.HTML().add_class("slideloop-train-time")
        # an empty Image is a broken-image icon: start with the empty chart that says what will come
        self.curves = w.Image(value=empty_curves(TrainSettings.epochs), format="png",
                              layout=w.Layout(width="560px")).add_class("slideloop-curves")
        self.curve_caption = w.HTML().add_class("slideloop-curve-caption")
        self.compare = w.HTML().add_class("slideloop-compare")
        self.models = w.HTML().add_class("slideloop-models")
        self.rounds = w.HTML().add_class("slideloop-rounds")
        self.object_classes = w.SelectMultiple(options=[], rows=2, description="Classes",
                                               layout=w.Layout(width="260px"), style={"description_width": "60px"},
                                               tooltip="instance-like classes (nuclei, glands) to score per object")
        self.object_classes.add_class("slideloop-object-classes")
        self.objects_btn = w.Button(description="Object metrics", icon="calculator",
                                    tooltip="AJI, object F1, Dice and Hausdorff of the active model on the labelled "
                                            "patches (re-runs it at full resolution: can take a while)")
        self.objects_btn.add_class("slideloop-objects-btn")
        self.objects = w.HTML().add_class("slideloop-objects")
        self._objects_running = False
        self.kept = KeptBack(state)
        self.from_model.observe(lambda _: self._sync_encoder(), names="value")

        controls = w.VBox([w.HTML("<h4>Train</h4>"), self.from_model, self.encoder, self.epochs, self.batch,
                           self.lr, self.max_steps, self.augment, w.HBox([self.train_btn, self.cancel_btn])],
                          layout=w.Layout(width="410px", min_width="410px"))
        run = w.VBox([w.HTML("<h4>Run</h4>"), self.status, self.progress, self.timing,
                      w.HTML("<h4>Learning curves</h4>"), self.curves, self.curve_caption],
                     layout=w.Layout(flex="1 1 auto", padding="0 0 0 16px"))
        super().__init__([w.HTML(_TABLE_CSS), w.HBox([controls, run]), self.kept, w.HTML("<h4>Against the parent</h4>"),
                          self.compare, w.HTML("<h4>Rounds</h4>"), self.rounds,
                          w.HTML("<h4>Object metrics</h4>"), w.HBox([self.object_classes, self.objects_btn]),
                          self.objects, w.HTML("<h4>Model versions</h4>"), self.models], **kwargs)
        self.add_class("slideloop-train-panel")
        self.train_btn.on_click(self._on_train)
        self.cancel_btn.on_click(self._on_cancel)
        self.objects_btn.on_click(self._on_objects)

        self.refresh()
        if poll:
            self.follower.start()
            threading.Thread(target=self._poll, name="slideloop-train-poll", daemon=True).start()

    # --- polling -----------------------------------------------------------------------------------
    def _poll(self) -> None:
        while not self._stop.wait(POLL_S):
            try:
                self.refresh()
            except Exception as err:  # the thread must outlive a bad poll (e.g. a locked database)
                log.exception("training panel poll failed")
                self._say(f"Could not read the training state: {type(err).__name__}: {err}", "error")

    def close(self) -> None:
        """Stop polling the training state and close the panel's widgets."""
        self._stop.set()
        if self._own_follower:
            self.follower.stop()
        super().close()

    def refresh(self) -> None:
        """Bring every widget up to the store's state; apply a finished run's model to the queue."""
        with self._lock:
            job = self.service.current_job()
            view = self.service.view(job) if job is not None else None
            self._show_models(view)
            self._show_rounds(view)
            if view is None:
                self._say("No training run yet. Set the options and press Train: the model trains on the "
                          "labelled patches, then predicts every patch and re-ranks the review queue.")
                self._set_busy(False)
                return
            self._show_run(view)
            self._show_curves(view)
            if self.follower.apply(view):
                self._show_models(view, force=True)
            self.kept.refresh()
            if view.status == "done" and view.model_id is not None:
                self._show_compare(view)

    # --- state → widgets -------------------------------------------------------------------------
    def _model_row(self, v: RunView) -> ModelRow | None:
        return None if v.model_id is None else self.state.project.models.get(v.model_id)

    def _say(self, text: str, level: str = "info") -> None:
        value = message_html(text, level)
        if self.status.value != value:
            self.status.value = value

    def _set_busy(self, active: bool, cancelling: bool = False) -> None:
        self.train_btn.disabled = active or self._submitting
        self.cancel_btn.disabled = not active or cancelling

    def _show_run(self, v: RunView) -> None:
        active_model = self.state.model_id
        keep = f"model {active_model} stays active" if active_model is not None else "no model is active"
        what = f"from model {v.parent_id}" if v.parent_id is not None else "a new model"
        level = "info"
        if v.status == "queued":
            text = f"Job {v.job_id} is queued ({what})"
            if v.position is not None:
                text += f": position {v.position + 1} in the queue, {v.position} job(s) ahead."
            else:
                text += ": waiting for the compute worker."
        elif v.status == "running" and v.stage == "predict":
            text = f"Job {v.job_id}: model {v.model_id} trained; predicting every patch to re-rank the queue."
        elif v.status == "running":
            text = f"Job {v.job_id} is training model {v.model_id or '…'} ({what}): epoch {max(v.epoch, 1)}/{v.epochs}"
            if v.steps_per_epoch:
                text += f", step {v.step}/{v.steps_per_epoch}"
            if v.loss is not None:
                text += f", loss {v.loss:.3f}"
            text += "."
        elif v.status == "done":
            text = finished_message(v, self._model_row(v))
            level = "ok" if self.state.model_id == v.model_id else "warning"
        elif v.status == "cancelled":
            text, level = f"Job {v.job_id} was cancelled; {keep}.", "warning"
        else:
            text, level = f"Job {v.job_id} failed: {v.error or 'no error recorded'}. {keep[0].upper()}{keep[1:]}.", "error"
        if v.active and v.cancel_requested:
            text += " Cancelling: it stops at its next step."
        # the bar before the words: a reader who sees "finished" should not see the bar short of full
        if abs(self.progress.value - v.fraction) > 1e-6:
            self.progress.value = v.fraction
        self.progress.bar_style = {"done": "success", "failed": "danger", "cancelled": "warning"}.get(v.status, "")
        self._say(text, level)
        self._set_busy(v.active, cancelling=v.cancel_requested)
        timing = []
        if v.elapsed is not None:
            timing.append(f"elapsed {_clock(v.elapsed)}")
        if v.remaining is not None:
            timing.append(f"remaining ~{_clock(v.remaining)} (training)")
        if v.status == "queued":
            timing.append("not started yet")
        value = f"<div style='color:#444'>{' · '.join(timing)}</div>"
        if self.timing.value != value:
            self.timing.value = value

    def _show_curves(self, v: RunView) -> None:
        key = (v.job_id, tuple((h.get("epoch"), h.get("train_loss"), h.get("val_loss")) for h in v.history))
        if self._shown.get("curves") == key:
            return
        self._shown["curves"] = key
        self.curves.value = render_curves(v.history, v.epochs)
        n = len(v.history)
        self.curve_caption.value = (f"<div style='color:#444;font-size:12px'>model {v.model_id or '…'}: "
                                    f"{n} epoch{'s' if n != 1 else ''} plotted</div>")

    def _show_compare(self, v: RunView) -> None:
        baseline = v.parent_id
        if baseline is None:  # a new model: compare with the finished model before it
            done = [m.id for m in self.service.models() if m.status == "done" and m.id < (v.model_id or 0)]
            baseline = done[-1] if done else None
        key = (v.model_id, baseline)
        if self._shown.get("compare") == key:
            return
        self._shown["compare"] = key
        rows = self.service.comparison(v.model_id or 0, baseline)
        title = dict(METRICS)
        head = (f"<tr><th style='text-align:left'>metric</th><th>model {baseline}</th><th>model {v.model_id}</th>"
                "<th>change</th></tr>") if baseline is not None else (
            f"<tr><th style='text-align:left'>metric</th><th>model {v.model_id}</th></tr>")
        body = []
        for key_, old, new in rows:
            cells = f"<td style='text-align:left'>{title[key_]}</td>"
            if baseline is not None:
                cells += f"<td>{num(old)}</td><td>{num(new)}</td>{_delta(key_, old, new)}"
            else:
                cells += f"<td>{num(new)}</td>"
            body.append(f"<tr>{cells}</tr>")
        note = ("" if baseline is not None else
                "<div style='color:#555;font-size:12px'>A new model with no earlier version to compare with.</div>")
        self.compare.value = f"{note}<table>{head}{''.join(body)}</table>"

    def _show_models(self, v: RunView | None, force: bool = False) -> None:
        models = self.service.models()
        active = self.state.model_id
        key = (tuple((m.id, m.status, m.best_epoch, tuple(sorted(m.metrics.items()))) for m in models), active)
        if not force and self._shown.get("models") == key:
            return
        self._shown["models"] = key
        choices = [("new model", NEW)] + [(f"model {m.id} ({m.encoder})", m.id) for m in reversed(models)
                                           if m.status == "done"]
        first = "from_model" not in self._shown
        self._shown["from_model"] = True
        if list(self.from_model.options) != choices:
            keep = self.from_model.value if self.from_model.value in {c[1] for c in choices} else NEW
            if first and len(choices) > 1:
                keep = choices[1][1]  # the loop's usual round: continue from the newest model
            self.from_model.options = choices
            self.from_model.value = keep
        if not models:
            self.models.value = "<div style='color:#555'>No model versions yet.</div>"
            return
        head = ("<tr><th>model</th><th>parent</th><th style='text-align:left'>encoder</th><th>status</th>"
                "<th>best epoch</th>" + "".join(f"<th>{t}</th>" for _, t in METRICS) +
                "<th>wall s</th><th style='text-align:left'>ranking</th></tr>")
        rows = []
        for m in reversed(models):
            mark = "active" if m.id == active else ""
            status = m.status + (f": {html.escape(m.error)}" if m.error else "")
            rows.append(f"<tr class='{mark}' data-model='{m.id}'><td>{m.id}</td><td>{m.parent_id or '—'}</td>"
                        f"<td style='text-align:left'>{html.escape(m.encoder)}</td><td>{status}</td>"
                        f"<td>{m.best_epoch or '—'}</td>" +
                        "".join(f"<td>{num(m.metrics.get(k))}</td>" for k, _ in METRICS) +
                        f"<td>{num(m.wall_time, 1)}</td><td style='text-align:left'>{'◀ active' if mark else ''}"
                        "</td></tr>")
        self.models.value = f"<table>{head}{''.join(rows)}</table>"

    def _show_rounds(self, v: RunView | None) -> None:
        # per-slide IoU arrives with the run's predictions (the job's last stage): redraw when the job ends too
        key = (self._shown.get("models"), None if v is None else (v.job_id, v.status, v.stage))
        if self._shown.get("rounds") == key:
            return
        self._shown["rounds"] = key
        from al_core.learn.rounds import pending_corrections, project_rounds

        self.rounds.value = rounds_html(project_rounds(self.state.project), pending_corrections(self.state.project))
        names = instance_classes(self.state.project)
        if list(self.object_classes.options) != names:
            self.object_classes.rows = min(max(len(names), 2), 4)  # one row renders as a dropdown
            self.object_classes.options = names
            self.object_classes.value = tuple(names)
        self.objects_btn.disabled = self._objects_running or self.state.model_id is None or not names

    def _on_objects(self, _: Any = None) -> None:
        model_id = self.state.model_id
        classes = list(self.object_classes.value)
        if model_id is None or not classes or self._objects_running:
            return
        self._objects_running = True
        self.objects_btn.disabled = True
        self.objects.value = message_html(
            f"Computing object metrics of model {model_id} for {', '.join(classes)}: the model re-reads every "
            "labelled patch at full resolution, so this can take a minute.")
        # torch inference over every labelled patch: never in the kernel's message loop
        threading.Thread(target=self._compute_objects, args=(model_id, classes), name="slideloop-objects",
                         daemon=True).start()

    def _compute_objects(self, model_id: int, classes: list[str]) -> None:
        from al_core.learn.object_eval import object_metrics

        try:
            res = object_metrics(self.state.project, model_id, classes)
            self.objects.value = objects_html(res)
        except Exception as err:  # shown to the user; the panel stays usable
            log.exception("object metrics failed")
            self.objects.value = message_html(f"Object metrics failed: {type(err).__name__}: {err}", "error")
        finally:
            self._objects_running = False
            self.objects_btn.disabled = self.state.model_id is None

    def _sync_encoder(self) -> None:
        # a continued model keeps its parent's encoder: show it, and the choice is not the user's
        self.encoder.disabled = self.from_model.value != NEW
        if self.from_model.value == NEW and self._parent_encoder:
            self.encoder.value = TrainSettings.encoder  # back from a parent's encoder to the default
        self._parent_encoder = False
        if self.from_model.value != NEW:
            parent = next((m for m in self.service.models() if m.id == self.from_model.value), None)
            if parent is not None:
                if parent.encoder not in self.encoder.options:
                    self.encoder.options = [*self.encoder.options, parent.encoder]
                self.encoder.value = parent.encoder
                self._parent_encoder = True
        # the epoch and rate defaults follow the choice, unless the user typed other numbers: a continued
        # model fine-tunes at the recipe's lower rate rather than restarting at a from-scratch one
        new = self.from_model.value == NEW
        if self.epochs.value in (NEW_MODEL_EPOCHS, RETRAIN_EPOCHS):
            self.epochs.value = NEW_MODEL_EPOCHS if new else RETRAIN_EPOCHS
        if any(abs(self.lr.value - v) < 1e-12 for v in (NEW_MODEL_LR, RETRAIN_LR)):
            self.lr.value = NEW_MODEL_LR if new else RETRAIN_LR

    # --- widgets → service ---------------------------------------------------------------------------
    def settings(self) -> TrainSettings:
        """The training settings the controls show (a max-steps of 0 means no cap)."""
        return TrainSettings(encoder=self.encoder.value, epochs=int(self.epochs.value),
                             batch_size=int(self.batch.value), lr=float(self.lr.value), augment=bool(self.augment.value),
                             from_model=None if self.from_model.value == NEW else int(self.from_model.value),
                             max_steps=int(self.max_steps.value) or None)

    def _on_train(self, _: Any = None) -> None:
        try:
            settings = self.settings()
            settings.job_params()
        except ValueError as err:
            self._say(f"Not started: {err}", "error")
            return
        self._submitting = True
        self.train_btn.disabled = True
        self._say("Submitting the training job…")
        # connecting may start a LocalCluster (seconds): not in the kernel's message loop
        threading.Thread(target=self._submit, args=(settings,), name="slideloop-train-submit", daemon=True).start()

    def _submit(self, settings: TrainSettings) -> None:
        try:
            self.service.start(settings)
        except Exception as err:  # shown to the user; the panel stays usable
            self._submitting = False
            self._say(f"Not started: {type(err).__name__}: {err}", "error")
            self.train_btn.disabled = False
            return
        self._submitting = False
        self.refresh()

    def _on_cancel(self, _: Any = None) -> None:
        job = self.service.active_job()
        if job is None:
            return
        self.service.cancel(job.id)
        self.cancel_btn.disabled = True
        self.refresh()


def _loss_scale(ax: Any, losses: list[float]) -> None:
    """Loss axis limits that show the run: from 0 for one point (not matplotlib's ±40 % around it), and
    logarithmic when one epoch's loss dwarfs the others (an epoch-1 spike would flatten the rest)."""
    if not losses:
        return
    lo, hi = min(losses), max(losses)
    if lo > 0 and hi / lo > 20:
        ax.set_yscale("log")
    elif len(set(losses)) <= 2 or lo == hi:
        ax.set_ylim(0, max(hi, 1e-6) * 1.25)


@functools.lru_cache(maxsize=4)
def empty_curves(epochs: int) -> bytes:
    """The chart before the first epoch, drawn once per kernel (every panel starts with it; a warm kernel has
    drawn it before its page opens, see :data:`slideloop_apps.kernels.WARM_CODE`)."""
    return render_curves([], epochs)


def render_curves(history: list[dict[str, Any]], epochs: int) -> bytes:
    """Training and validation loss (left axis) and validation IoU (right axis) per epoch, as a PNG."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state in a long-lived kernel
    from matplotlib.ticker import MaxNLocator

    def series(key: str) -> list[float]:
        return [math.nan if h.get(key) is None else float(h[key]) for h in history]

    fig = Figure(figsize=(5.6, 2.8), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    ep = series("epoch")
    ax.plot(ep, series("train_loss"), "o-", color="#1f77b4", label="train loss")
    if any(h.get("val_loss") is not None for h in history):
        ax.plot(ep, series("val_loss"), "s-", color="#ff7f0e", label="val loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    _loss_scale(ax, [v for k in ("train_loss", "val_loss") for v in series(k) if v == v])
    ax.set_xlim(0.5, max(epochs, len(ep), 1) + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    if any(h.get("val_macro_iou") is not None for h in history):
        ax2.plot(ep, series("val_macro_iou"), "^--", color="#2ca02c", label="val IoU")
    ax2.set_ylim(0, 1)
    ax2.set_ylabel("IoU")
    if not history:
        ax.text(0.5, 0.5, "waiting for the first epoch", transform=ax.transAxes, ha="center", va="center",
                color="#777")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    if lines[0] or lines2[0]:
        ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper right", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 60}:{s % 60:02d}"


def _delta(key: str, old: float | None, new: float | None) -> str:
    if old is None or new is None:
        return "<td>—</td>"
    d = new - old
    better = d < 0 if key in LOWER_IS_BETTER else d > 0
    color = "#0c5a1c" if better else ("#8a1010" if d else "#444")
    return f"<td style='color:{color}'>{d:+.3f}</td>"
