"""The active-learning history of a project: one round per finished model version, oldest first.

A round is the training run of a model version and the label work done since the run before it started:

- **corrections**: distinct patch regions a reviewer saved an edit on (paint, erase, accept, revert, polygon edit)
  whose new label version lies after the previous model's label versions and at or before this model's (each
  model records its slides' label versions when its training starts, so this is exact, not a clock comparison);
- **reviewed**: distinct patch regions marked reviewed with their labels kept (no new version, so these go by the
  review's time: after the previous model's start, up to this one's; times are to the second, and a review in
  the second a model started counts toward that model, as a reviewer marks and then presses Train), not counting
  corrected ones;
- **label versions**: new label versions of all slides in the window (imports and edits without a patch too).

Validation figures are the model's best epoch on the project's fixed validation set as it stood for that run
(the set only grows, so later rounds are scored on a superset of earlier rounds' patches); per-class figures are
over the model's output channels, Background included, and their mean is the macro figure training reports.
Models trained before per-class figures were stored fall back to the model's stored patch confusions on its
validation patches. Per-slide IoU is the macro IoU of the model's stored predictions on the labelled patches of
the current grid (train and validation patches, per patch → per slide), empty until the model has predicted.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from al_core.learn.metrics import aggregate, scores

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from al_core.project.project import Project

#: review actions that keep the labels as they are (no new label version)
KEEP_ACTIONS = frozenset({"reviewed"})
#: model statuses that make a round (a cancelled run with a checkpoint can be active, so it counts)
FINISHED = frozenset({"done", "cancelled"})


@dataclass(frozen=True)
class Review:
    """One stored review: the region (slide id, x, y, size), the label version it saved or saw, action, time."""

    slide_id: int
    region: tuple[int, int, int, int]
    label_version: int
    action: str
    created_at: str


@dataclass(frozen=True)
class ModelFacts:
    """What a round needs of one model version (plain data, so :func:`build_rounds` is pure)."""

    id: int
    parent_id: int | None
    status: str
    created_at: str
    finished_at: str | None
    #: label version per slide id when training started
    label_versions: Mapping[int, int]
    train_patches: int
    val_patches: int
    class_names: Sequence[str]
    val_iou: Sequence[float] | None
    val_dice: Sequence[float] | None
    val_macro_iou: float | None
    val_macro_dice: float | None
    #: macro IoU per slide name from the model's stored predictions (empty: not predicted)
    slide_iou: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Round:
    """One round of the loop: a model version and the label work that went into it."""

    round: int
    model_id: int
    parent_id: int | None
    status: str
    started: str
    finished: str | None
    corrections: int
    reviewed: int
    label_versions: int
    train_patches: int
    val_patches: int
    val_iou: dict[str, float]
    val_dice: dict[str, float]
    mean_iou: float | None
    mean_dice: float | None
    #: against the round before (``None`` in the first round or when either figure is missing)
    delta_iou: float | None
    delta_dice: float | None
    slide_iou: dict[str, float]
    #: the model was made active at some point (by validation or by a user)
    promoted: bool
    #: the model is the project's active model now
    active: bool

    def to_dict(self) -> dict[str, Any]:
        """Plain data (NaN becomes ``None``, so it is valid JSON)."""
        out: dict[str, Any] = _clean(asdict(self))
        return out


def build_rounds(models: Sequence[ModelFacts], reviews: Sequence[Review], activated: set[int],
                 active_id: int | None) -> list[Round]:
    """Rounds from the facts (see the module docstring): ``models`` finished, oldest first; ``activated``: ids of
    every model ever made active."""
    out: list[Round] = []
    prev: ModelFacts | None = None
    for k, m in enumerate(models, start=1):
        before: Mapping[int, int] = prev.label_versions if prev else {}
        since = prev.created_at if prev else ""
        corrected = {r.region for r in reviews if r.action not in KEEP_ACTIONS
                     and before.get(r.slide_id, 0) < r.label_version <= m.label_versions.get(r.slide_id, 0)}
        kept = {r.region for r in reviews if r.action in KEEP_ACTIONS
                and since < r.created_at <= m.created_at} - corrected
        versions = sum(max(v - before.get(s, 0), 0) for s, v in m.label_versions.items())
        mean_iou, mean_dice = _finite(m.val_macro_iou), _finite(m.val_macro_dice)
        out.append(Round(
            round=k, model_id=m.id, parent_id=m.parent_id, status=m.status, started=m.created_at,
            finished=m.finished_at, corrections=len(corrected), reviewed=len(kept), label_versions=versions,
            train_patches=m.train_patches, val_patches=m.val_patches,
            val_iou=_per_class(m.class_names, m.val_iou), val_dice=_per_class(m.class_names, m.val_dice),
            mean_iou=mean_iou, mean_dice=mean_dice,
            delta_iou=_delta(mean_iou, out[-1].mean_iou if out else None),
            delta_dice=_delta(mean_dice, out[-1].mean_dice if out else None),
            slide_iou=dict(m.slide_iou), promoted=m.id in activated, active=m.id == active_id))
        prev = m
    return out


def corrections_after(last: ModelFacts | None, reviews: Sequence[Review]) -> int:
    """Distinct patch regions corrected after ``last`` started (all of them when no model is finished yet): the
    corrections the next round will add."""
    before: Mapping[int, int] = last.label_versions if last else {}
    return len({r.region for r in reviews if r.action not in KEEP_ACTIONS and r.label_version > before.get(r.slide_id, 0)})


def pending_corrections(project: Project) -> int:
    """How many patches were corrected since the newest finished model started training (not in any round yet)."""
    slide_ids = {s.name: s.id for s in project.slides()}
    rows = [r for r in project.models.list() if r.status in FINISHED and r.checkpoint is not None]
    with project.store.read() as s:
        reviews = _reviews(s)
    return corrections_after(_facts(rows[-1], slide_ids, []) if rows else None, reviews)


def project_rounds(project: Project) -> list[Round]:
    """The rounds of a project's finished model versions, oldest first."""
    from sqlalchemy import select

    from al_core.project.models import ACTIVE_HISTORY_KEY
    from al_core.project.schema import PatchRow, PatchScoreRow, SlideRow

    slide_ids = {s.name: s.id for s in project.slides()}
    rows = [r for r in project.models.list() if r.status in FINISHED and r.checkpoint is not None]
    grid = project.grid_id()
    with project.store.read() as s:
        reviews = _reviews(s)
        scored: dict[int, list[tuple[int, str, str]]] = {}
        if rows:
            q = (select(PatchScoreRow.model_id, PatchScoreRow.patch_id, SlideRow.name, PatchScoreRow.confusion)
                 .join(PatchRow, PatchRow.id == PatchScoreRow.patch_id)
                 .join(SlideRow, SlideRow.id == PatchRow.slide_id)
                 .where(PatchScoreRow.model_id.in_([r.id for r in rows]), PatchScoreRow.confusion.is_not(None),
                        PatchRow.grid_id == grid))
            for mid, pid, name, cm in s.execute(q).all():
                scored.setdefault(int(mid), []).append((int(pid), str(name), str(cm)))
    history = project.store.get_meta(ACTIVE_HISTORY_KEY)
    activated = {int(rec["id"]) for rec in json.loads(history)} if history else set()
    active = project.models.active_record()
    facts = [_facts(r, slide_ids, scored.get(r.id, [])) for r in rows]
    return build_rounds(facts, reviews, activated, int(active["id"]) if active else None)


def _reviews(s: Session) -> list[Review]:
    from sqlalchemy import select

    from al_core.project.schema import ReviewRow

    return [Review(int(r.slide_id), (int(r.slide_id), int(r.x), int(r.y), int(r.size)), r.label_version, r.action,
                   r.created_at)
            for r in s.scalars(select(ReviewRow).where(ReviewRow.slide_id.is_not(None)))
            if r.slide_id is not None and r.x is not None and r.y is not None and r.size is not None]


def _facts(row: Any, slide_ids: Mapping[str, int], scored: list[tuple[int, str, str]]) -> ModelFacts:
    metrics: dict[str, Any] = json.loads(row.metrics or "{}")
    split: dict[str, Any] = json.loads(row.patches or "{}")
    config: dict[str, Any] = json.loads(row.config or "{}")
    names = [str(n) for n in config.get("class_names", [])]
    lv = {slide_ids[n]: int(v) for n, v in json.loads(row.label_versions or "{}").items() if n in slide_ids}
    val_ids = set(split.get("val", []))
    val_iou, val_dice = metrics.get("val_iou"), metrics.get("val_dice")
    mean_iou, mean_dice = metrics.get("val_macro_iou"), metrics.get("val_macro_dice")
    val_cms = [json.loads(cm) for pid, _, cm in scored if pid in val_ids]
    if val_iou is None and val_cms:  # a model from before per-class figures were stored
        sc = scores(np.sum(np.asarray(val_cms, dtype=np.int64), axis=0))
        val_iou, val_dice = sc["iou"], sc["dice"]
        mean_iou = sc["macro_iou"] if mean_iou is None else mean_iou
        mean_dice = sc["macro_dice"] if mean_dice is None else mean_dice
    slide_iou: dict[str, float] = {}
    if scored:
        agg = aggregate([n for _, n, _ in scored], np.asarray([json.loads(cm) for _, _, cm in scored],
                                                              dtype=np.int64), names or None)
        slide_iou = {n: float(v["macro_iou"]) for n, v in sorted(agg["slides"].items())}
    return ModelFacts(id=row.id, parent_id=row.parent_id, status=row.status, created_at=row.created_at,
                      finished_at=row.finished_at, label_versions=lv, train_patches=len(split.get("train", [])),
                      val_patches=len(val_ids), class_names=names, val_iou=val_iou, val_dice=val_dice,
                      val_macro_iou=mean_iou, val_macro_dice=mean_dice, slide_iou=slide_iou)


def _per_class(names: Sequence[str], values: Sequence[float] | None) -> dict[str, float]:
    if values is None:
        return {}
    labels = list(names) if len(names) == len(values) else [str(i) for i in range(len(values))]
    return {n: float(v) for n, v in zip(labels, values, strict=True)}


def _finite(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _delta(new: float | None, old: float | None) -> float | None:
    return None if new is None or old is None else new - old


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_clean(x) for x in v]
    return v
