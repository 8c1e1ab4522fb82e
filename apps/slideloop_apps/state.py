"""The review app's state between the widgets and :mod:`al_core`: traits only, no ipywidgets import.

Everything that must survive a restart (labels, reviews, models) lives in the project store; this object only
holds the current selection, the shapes drawn but not yet saved, and the last message for the user.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import shapely
from shapely.geometry import box, shape
from shapely.geometry.base import BaseGeometry
from traitlets import Bool, HasTraits, Instance, Int, List, Unicode

from al_core.errors import LabelError, NoModelError, SlideloopError
from al_core.project.classes import ClassInfo
from al_core.project.label_edits import EditHistory
from al_core.project.labels import LabelConflictError
from al_core.project.project import PROJECT_ENV, Project
from al_core.project.schema import PatchRow
from al_core.tiles.pyramid import Pyramid
from slideloop_apps import BASE_URL_ENV, ROUTE_PREFIX
from slideloop_apps.ui import slide_label

AUTHOR_ENV = "SLIDELOOP_AUTHOR"
#: the pending mode of a region where the label takes the model's prediction (accept inside a region)
ACCEPT = -1


def server_base_url() -> str:
    """The Jupyter server's base URL as the kernel can learn it (set by the extension; Voilà/hub fallbacks)."""
    for var in (BASE_URL_ENV, "VOILA_BASE_URL", "JUPYTERHUB_SERVICE_PREFIX"):
        value = os.environ.get(var)
        if value:
            return value if value.endswith("/") else value + "/"
    return "/"


def tiles_root() -> str:
    """The tile server's URL prefix (``<base_url>slideloop/``) as the kernel can learn it."""
    return f"{server_base_url()}{ROUTE_PREFIX}/"


@dataclass(frozen=True)
class QueueItem:
    """One row of the review queue."""

    patch_id: int
    slide_id: int
    slide: str
    x: int
    y: int
    size: int
    iou: float | None
    uncertainty: float | None
    reviewed: bool
    labelled: bool
    #: its label changed since the ranking model predicted it (the IoU is against the new label already)
    changed: bool = False


class AppState(HasTraits):
    """Selection and pending edits of one reviewer's session over one project."""

    project = Instance(Project)
    slide_id = Int(0)
    patch_id = Int(None, allow_none=True)
    #: class index drawn shapes get; 0 erases to background
    mode = Int(1)
    #: shapes drawn since the last save, as (mode, geometry in level-0 px); mode :data:`ACCEPT` takes the
    #: prediction there
    pending: List[tuple[int, BaseGeometry]] = List()
    #: the slide's label version when the first pending shape was drawn (what the edit was drawn on)
    pending_base = Int(None, allow_none=True)
    #: the slide's label version the map showed when this patch was picked or the overlays last refetched:
    #: what a shape drawn now is drawn on, even if another annotator saved since (their edit is not shown)
    view_version = Int(None, allow_none=True)
    queue: List[QueueItem] = List()
    model_id = Int(None, allow_none=True)
    #: bumped after every saved change so overlays refetch
    revision = Int(0)
    message = Unicode("")
    level = Unicode("info")
    author = Unicode("reviewer")
    #: the model has stored predictions (overlay, ranked queue, accept)
    has_predictions = Bool(False)
    #: why the model's predictions cannot be used, for the model note
    model_problem = Unicode("")
    #: bumped when another model takes over ranking (the prediction overlay and model note follow it)
    model_revision = Int(0)
    #: go on to the next queue patch after Save and Accept
    auto_advance = Bool(False)
    #: saved edits of this session, for undo and redo across saves
    history = Instance(EditHistory, ())

    def __init__(self, project: Project, **kwargs: Any) -> None:
        super().__init__(project=project, **kwargs)
        slides = project.slides()
        if not slides:
            raise SlideloopError(f"project {project.root} has no slides; add one with 'slideloop add'")
        self.slide_id = slides[0].id
        self.model_id = self.latest_model_id()
        self.refresh_queue()

    @classmethod
    def from_env(cls) -> AppState:
        """Open the project named by ``SLIDELOOP_PROJECT`` (set by ``slideloop app``)."""
        path = os.environ.get(PROJECT_ENV)
        if not path:
            raise SlideloopError(f"no project given: start the app with 'slideloop app PROJECT' or set {PROJECT_ENV}")
        author = os.environ.get(AUTHOR_ENV) or os.environ.get("JUPYTERHUB_USER") or "reviewer"
        return cls(Project.open(path), author=author)

    # --- what the widgets show ---------------------------------------------------------------------
    def say(self, message: str, level: str = "info") -> None:
        """Set the message the page shows and its level (``info``, ``warning`` or ``error``)."""
        self.level = level
        self.message = message

    def classes(self) -> list[ClassInfo]:
        """The project's label classes."""
        return self.project.classes()

    def slide_choices(self) -> list[tuple[str, int]]:
        """(name, ID) of each project slide for the slide picker."""
        return [(slide_label(r.name, r.mpp), r.id) for r in self.project.slides()]

    def pyramid(self, slide_id: int | None = None) -> Pyramid:
        """The tile geometry of a slide (default: the current one)."""
        row = self.project.slide_row(self.slide_id if slide_id is None else slide_id)
        return Pyramid(row.width, row.height)

    def mpp(self) -> float | None:
        """The current slide's µm/px (``None``: unknown)."""
        return self.project.slide_row(self.slide_id).mpp

    def slide_problem(self) -> str | None:
        """Why the current slide's pixels cannot be shown, or ``None`` when its file is there."""
        row = self.project.slide_row(self.slide_id)
        if not Path(row.path).is_file():
            return (f"The file of slide '{row.name}' is missing ({Path(row.path).name} was moved or deleted "
                    "after it was registered): its image cannot be shown; labels, queue and drawing still work.")
        if self.project.grid_id() is not None and not self.project.patches(row.id):
            return (f"Slide '{row.name}' has no tissue patches in the grid (no tissue was found on it, or none "
                    "reaching the grid's minimum tissue share), so it has no review queue; the queue lists "
                    "other slides' patches only.")
        return None

    def tile_urls(self) -> dict[str, str]:
        """Leaflet URL templates of the current slide, its labels (keyed by :attr:`revision` so they refetch
        after a save) and, when the model has predictions, its prediction."""
        root, sid = tiles_root(), self.slide_id
        urls = {"slide": f"{root}tiles/{sid}/{{z}}/{{x}}/{{y}}.jpeg",
                "labels": f"{root}labels/{sid}/{{z}}/{{x}}/{{y}}.png?v={self.revision}"}
        if self.model_id is not None and self.has_predictions:
            urls["prediction"] = f"{root}prediction/{sid}/{self.model_id}/{{z}}/{{x}}/{{y}}.png"
            urls["errors"] = f"{root}errors/{sid}/{self.model_id}/{{z}}/{{x}}/{{y}}.png?v={self.revision}"
        return urls

    def prediction_contours(self) -> list[tuple[int, BaseGeometry]]:
        """The model's prediction for the current patch as smooth (class, polygon) outlines in level-0 px."""
        if self.patch_id is None or self.model_id is None or not self.has_predictions:
            return []
        from al_core.tiles.contours import smooth_contours

        patch = self.project.patch(self.patch_id)
        try:
            classes = self.project.predictions.classes(self.model_id, patch.id)
        except (SlideloopError, FileNotFoundError, KeyError):
            return []  # this patch was not predicted by the model (e.g. a newer grid)
        return smooth_contours(classes, (patch.x, patch.y), patch.size / classes.shape[1])

    def latest_model_id(self) -> int | None:
        """The project's active model (the newest finished one where none was chosen), if one was trained."""
        try:
            return self.project.models.resolve("active").id
        except NoModelError:
            return None

    def use_model(self, model_id: int | None = None) -> None:
        """Rank the queue and draw the overlay with ``model_id`` (default: the project's active model), e.g.
        after a training run finished; the queue is re-ranked from scratch."""
        self.model_id = self.latest_model_id() if model_id is None else model_id
        self.refresh_queue()
        self.model_revision += 1

    def model_note(self) -> str:
        """One line on how the queue is ordered: by IoU and uncertainty with a usable model, else why not."""
        if self.model_id is None:
            return "No model is trained yet: the queue lists patches by review status; train one to rank by IoU."
        if not self.has_predictions:
            return (f"Model {self.model_id} cannot rank the queue yet ({self.model_problem}); "
                    "the queue lists patches by review status.")
        return (f"Model {self.model_id}: the queue lists the lowest IoU (prediction vs label) first, then the most "
                "uncertain unlabelled patches.")

    # --- the queue -----------------------------------------------------------------------------------
    def refresh_queue(self, keep_order: bool = False) -> None:
        """Rebuild the queue; with ``keep_order`` only update its flags, so that "next" after a save goes on
        from the row just reviewed instead of jumping to wherever that row would now sort."""
        fresh = self._ranked_queue() if self.model_id is not None else None
        self.has_predictions = fresh is not None
        if fresh is None:
            fresh = self._plain_queue()
        if keep_order and self.queue:
            by_id = {q.patch_id: q for q in fresh}
            old = [by_id.pop(q.patch_id) for q in self.queue if q.patch_id in by_id]
            fresh = old + list(by_id.values())
        self.queue = fresh

    def _plain_queue(self) -> list[QueueItem]:
        """Without a model: unreviewed patches first, unlabelled before labelled, then slide order."""
        names = {r.id: r.name for r in self.project.slides()}
        reviewed, labelled = self.project.reviewed_patch_ids(), self.project.labelled_patch_ids()
        items = [QueueItem(p.id, p.slide_id, names[p.slide_id], p.x, p.y, p.size, None, None,
                           p.id in reviewed, p.id in labelled) for p in self.project.patches()]
        return sorted(items, key=lambda q: (q.reviewed, q.labelled, q.slide_id, q.y, q.x))

    def _ranked_queue(self) -> list[QueueItem] | None:
        """Lowest IoU first (labelled), then most uncertain (unlabelled); ``None`` (and :attr:`model_problem`
        set) when the model has no stored predictions."""
        from al_core.learn.rank import review_queue  # pandas: not before a model exists (first paint)
        from al_core.learn.rescore import changed_since_prediction

        try:
            frames = [review_queue(self.project, self.model_id, by=by, fraction=1.0)
                      for by in ("iou", "entropy")]
            changed = changed_since_prediction(self.project, self.model_id) if self.model_id is not None else set()
        except SlideloopError as err:
            self.model_problem = str(err)
            return None
        ids = {r.name: r.id for r in self.project.slides()}
        reviewed, labelled = self.project.reviewed_patch_ids(), self.project.labelled_patch_ids()
        out, seen = [], set()
        for df in frames:
            for r in df.to_dict(orient="records"):
                pid = int(r["patch_id"])
                seen.add(pid)
                slide = str(r["slide"])
                out.append(QueueItem(pid, ids[slide], slide, int(r["x"]), int(r["y"]), int(r["size"]),
                                     _number(r["iou"]), _number(r["entropy"]), pid in reviewed, pid in labelled,
                                     pid in changed))
        # patches the model did not score (e.g. labelled after it predicted) still get a row, at the end
        return out + [q for q in self._plain_queue() if q.patch_id not in seen]

    def select_patch(self, patch_id: int) -> PatchRow:
        """Make a patch the current one, switching to its slide if needed; returns its row."""
        patch = self.project.patch(patch_id)
        if patch.slide_id != self.slide_id:
            self.select_slide(patch.slide_id)
        self.patch_id = patch_id
        self.view_version = self.project.label_version(patch.slide_id)
        return patch

    def select_slide(self, slide_id: int) -> None:
        """Switch to a slide with no patch chosen; unsaved shapes are dropped."""
        self.pending = []
        self.patch_id = None
        self.slide_id = slide_id
        self.view_version = self.project.label_version(slide_id)
        problem = self.slide_problem()
        if problem:
            self.say(problem, "error")
        else:
            self.say(f"Showing slide '{self.project.slide_row(slide_id).name}'. Pick a patch in the queue.")

    def step(self, delta: int) -> int | None:
        """Move ``delta`` rows through the queue; returns the new patch id (None for an empty queue)."""
        if not self.queue:
            return None
        ids = [q.patch_id for q in self.queue]
        pos = ids.index(self.patch_id) + delta if self.patch_id in ids else (0 if delta >= 0 else len(ids) - 1)
        pos = min(max(pos, 0), len(ids) - 1)
        self.select_patch(ids[pos])
        return ids[pos]

    # --- drawing -------------------------------------------------------------------------------------
    def add_drawn(self, geojson: dict[str, Any]) -> bool:
        """Queue a drawn GeoJSON feature (map coordinates) for saving; refuses it with a message if unusable."""
        try:
            geom, repaired = self._to_slide_geometry(geojson)
        except (LabelError, ValueError, TypeError, KeyError, shapely.errors.GEOSException) as err:
            self.say(f"Shape not used: {err}", "error")
            return False
        if not self.pending:
            self.pending_base = self._drawn_on()
        self.pending = [*self.pending, (self.mode, geom)]
        name = "erase" if self.mode == 0 else self._class_name(self.mode)
        note = "The shape crossed itself and was repaired into valid polygons. " if repaired else ""
        self.say(f"{note}{len(self.pending)} shape(s) to save (last: {name}). Save writes them as a new label "
                 "version.", "warning" if repaired else "info")
        return True

    def add_region(self, mode: int, geom: BaseGeometry, what: str = "shape") -> bool:
        """Queue a region in level-0 px (a brush stroke, a wand selection) with ``mode`` for saving."""
        pyr = self.pyramid()
        geom = shapely.make_valid(geom).intersection(box(0, 0, pyr.width, pyr.height))
        if geom.is_empty or geom.area < 1:
            self.say(f"The {what} lies outside the slide: nothing to save.", "warning")
            return False
        if mode == ACCEPT and (self.patch_id is None or not self.has_predictions):
            self.say("Accepting the prediction in a region needs a patch with a prediction: pick one in the queue.",
                     "warning")
            return False
        if not self.pending:
            self.pending_base = self._drawn_on()
        self.pending = [*self.pending, (mode, geom)]
        name = {0: "erase", ACCEPT: "accept prediction"}.get(mode) or self._class_name(mode)
        self.say(f"{len(self.pending)} shape(s) to save (last: {what}, {name}). Save (s) writes them as a new "
                 "label version.")
        return True

    def _drawn_on(self) -> int:
        if self.view_version is not None:
            return self.view_version
        return self.project.label_version(self.slide_id)

    def _to_slide_geometry(self, geojson: dict[str, Any]) -> tuple[BaseGeometry, bool]:
        """The drawn shape in level-0 px, made valid and clipped to the slide; and whether it was repaired."""
        geometry = geojson.get("geometry", geojson)
        pyr = self.pyramid()
        geom = pyr.geometry_from_map(shape(geometry))
        repaired = not geom.is_valid
        geom = shapely.make_valid(geom)
        polys = [g for g in getattr(geom, "geoms", [geom]) if g.area > 0]
        if not polys:
            raise LabelError("drawing", "the shape has no area (draw at least three distinct points)")
        geom = shapely.union_all(polys).intersection(box(0, 0, pyr.width, pyr.height))
        if geom.is_empty or geom.area < 1:
            raise LabelError("drawing", "the shape lies outside the slide")
        return geom, repaired

    def undo(self) -> None:
        """Drop the last shape drawn since the last save."""
        if self.pending:
            self.pending = self.pending[:-1]
            self.say(f"Removed the last shape; {len(self.pending)} left to save.")
        else:
            self.say("Nothing to undo.")

    def save(self) -> int | None:
        """Write the pending shapes as label versions (consecutive shapes of one class merged into one
        correction), mark the current patch reviewed, and refresh overlays. Returns the last version."""
        if not self.pending:
            self.say("Nothing to save: draw a region first.", "warning")
            return None
        groups: list[tuple[int, list[BaseGeometry]]] = []
        for mode, geom in self.pending:
            if groups and groups[-1][0] == mode:
                groups[-1][1].append(geom)
            else:
                groups.append((mode, [geom]))
        version = None
        base = self.pending_base
        before = self.project.label_version(self.slide_id)
        try:
            for i, (mode, geoms) in enumerate(groups):
                version = self._write(mode, shapely.union_all(geoms), base if i == 0 else None)
        except LabelConflictError as err:
            self.refetch()  # show the other edit; shapes drawn from now on are drawn on it
            self.say(f"Not saved: {err.problem}. Your unsaved shapes are still on the map.", "error")
            return None
        except SlideloopError as err:
            self.say(f"Not saved: {err}", "error")
            return None
        if version is not None:
            self.history.record(shapely.union_all([g for _, g in self.pending]), before, version)
        self.pending = []
        self.pending_base = None
        self._after_write(f"Saved label version {version}")
        return version

    def _write(self, mode: int, geom: BaseGeometry, base: int | None) -> int:
        if mode == ACCEPT:
            if self.patch_id is None or self.model_id is None:
                raise SlideloopError("accepting the prediction in a region needs a patch and a model")
            return self.project.accept_prediction(self.patch_id, self.model_id, author=self.author, region=geom,
                                                  base_version=base)
        return self.project.correct(self.slide_id, geom, mode or None, author=self.author, patch_id=self.patch_id,
                                    base_version=base)

    def undo_saved(self, redo: bool = False) -> int | None:
        """Undo (or redo) the last saved edit of this session: its region reverts to the version before (or
        after) it, as a new label version."""
        step = self.history.redo() if redo else self.history.undo()
        if step is None:
            self.say(f"Nothing to {'redo' if redo else 'undo'}.")
            return None
        region, to_version = step
        try:
            version = self.project.labels.revert(self.slide_id, region, to_version, author=self.author)
            self.project.rescore(self.slide_id, region, since=version - 1)
        except SlideloopError as err:
            self.say(f"Not {'redone' if redo else 'undone'}: {err}", "error")
            return None
        self.refetch()
        self.refresh_queue(keep_order=True)
        self.say(f"{'Redid' if redo else 'Undid'} the last saved edit: its region shows label version "
                 f"{to_version} again (saved as version {version}).")
        return version

    def accept_prediction(self) -> int | None:
        """Replace the current patch's labels by the model's prediction, in one label version."""
        if self.model_id is None or not self.has_predictions:
            self.say("No model is trained yet: there is no prediction to accept.", "warning")
            return None
        if self.patch_id is None:
            self.say("Choose a patch in the queue first.", "warning")
            return None
        try:
            before = self.project.label_version(self.slide_id)
            version = self.project.accept_prediction(self.patch_id, self.model_id, author=self.author)
        except SlideloopError as err:
            self.say(f"No prediction for this patch: {err}", "error")
            return None
        patch = self.project.patch(self.patch_id)
        self.history.record(box(patch.x, patch.y, patch.x + patch.size, patch.y + patch.size), before, version)
        self._after_write(f"Accepted the prediction as label version {version}")
        return version

    def refetch(self) -> None:
        """Make the overlays refetch; what they show from now on is what new shapes are drawn on."""
        self.revision += 1
        self.view_version = self.project.label_version(self.slide_id)

    def _after_write(self, what: str) -> None:
        self.refetch()
        row = next((q for q in self.queue if q.patch_id == self.patch_id), None)
        self.refresh_queue(keep_order=True)
        where = f" for patch {row.patch_id} ({row.slide} x={row.x}, y={row.y}); marked reviewed" if row else ""
        if self.auto_advance and row is not None and self.step(+1) != row.patch_id:
            where += "; on to the next patch"
        self.say(what + where + ".")

    def _class_name(self, idx: int) -> str:
        return next((c.name for c in self.classes() if c.idx == idx), str(idx))


def _number(value: Any) -> float | None:
    """A score from a pandas row: ``None`` for missing (NaN)."""
    return None if value is None or value != value else float(value)


#: the map zooms in quarter steps (Leaflet scales the tiles between native zooms)
ZOOM_SNAP = 0.25


def fit_zoom(pyramid: Pyramid, size: float, view_px: int = 600) -> float:
    """The zoom (a multiple of :data:`ZOOM_SNAP`) at which ``size`` level-0 px span at most ``view_px`` screen px."""
    z = pyramid.zmax - math.log2(max(size, 1) / view_px)
    return min(float(pyramid.zmax), max(0.0, math.floor(z / ZOOM_SNAP) * ZOOM_SNAP))


def patch_center(patch: PatchRow, pyramid: Pyramid) -> tuple[float, float]:
    """The map (lat, lng) of a patch's centre."""
    return pyramid.to_latlng(patch.x + patch.size / 2, patch.y + patch.size / 2)


def patch_outline(patches: Sequence[PatchRow], pyramid: Pyramid) -> dict[str, Any]:
    """GeoJSON rectangles (map coordinates) of patches, their ids in the properties."""
    feats = []
    for p in patches:
        (s, w), (n, e) = pyramid.to_latlng(p.x, p.y + p.size), pyramid.to_latlng(p.x + p.size, p.y)
        feats.append({"type": "Feature", "properties": {"patch_id": p.id},
                      "geometry": {"type": "Polygon", "coordinates": [[[w, s], [e, s], [e, n], [w, n], [w, s]]]}})
    return {"type": "FeatureCollection", "features": feats}
