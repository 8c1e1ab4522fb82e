"""The review queue: a query over the stored per-patch scores of a model version (no recomputation).

Labelled patches are ranked by *lowest* IoU between prediction and current label (the NoCodeSeg refinement:
review the ~5 % worst); unlabelled patches by uncertainty (mean predictive entropy, or TTA disagreement when
predicted with ``--tta``, or MC-dropout mutual information when predicted with ``--mc-dropout``). A :class:`Ranker` orders a scores frame; :func:`review_queue` selects a fraction or
a count of it, over the project or per slide.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Protocol

import numpy as np
import pandas as pd
from sqlalchemy import select

from al_core.errors import NoModelError, ProjectError
from al_core.project.models import ModelRef
from al_core.project.schema import PatchRow, PatchScoreRow, SlideRow

if TYPE_CHECKING:
    from al_core.project.project import Project

COLUMNS = ["patch_id", "slide", "col", "row", "x", "y", "size", "labelled", "iou", "dice", "entropy",
           "disagreement", "label_version", "mcdropout"]
#: uncertainty scores stored per patch, and how to get them when they are missing
UNCERTAINTIES = {"entropy": "", "disagreement": "predict with test-time augmentation first (--tta)",
                 "mcdropout": "predict with MC dropout first (--mc-dropout N)"}


class Ranker(Protocol):
    """Orders candidate patches, most worth reviewing first. ``labelled`` says which patches it ranks."""

    name: str
    labelled: bool

    def __call__(self, scores: pd.DataFrame) -> pd.DataFrame:
        """The candidate rows of a scores frame, most worth reviewing first."""
        ...


class IoURanker:
    """Labelled patches, lowest prediction-vs-label IoU first (ties: higher entropy first)."""

    name = "iou"
    labelled = True

    def __call__(self, scores: pd.DataFrame) -> pd.DataFrame:
        """The labelled patches that have an IoU, lowest first."""
        df = scores[scores["labelled"] & scores["iou"].notna()]
        return df.sort_values(["iou", "entropy", "patch_id"], ascending=[True, False, True], kind="stable")


class UncertaintyRanker:
    """Unlabelled patches, most uncertain first: ``by`` is ``entropy``, ``disagreement`` (TTA) or ``mcdropout``."""

    labelled = False

    def __init__(self, by: str = "entropy") -> None:
        if by not in UNCERTAINTIES:
            raise ValueError(f"uncertainty is one of {', '.join(UNCERTAINTIES)}, got {by!r}")
        self.by = by
        self.name = by

    def __call__(self, scores: pd.DataFrame) -> pd.DataFrame:
        """The unlabelled patches, highest ``by`` first.

        Raises ``ProjectError`` when the model has none of that score stored (not predicted with TTA/MC dropout)."""
        df = scores[~scores["labelled"]]
        if self.by != "entropy" and df[self.by].isna().all() and len(df):
            raise ProjectError(f"no {self.by} scores stored for this model: {UNCERTAINTIES[self.by]}")
        return df.sort_values([self.by, "patch_id"], ascending=[False, True], kind="stable")


class RandomRanker:
    """A seeded random order (the baseline every strategy must beat)."""

    name = "random"

    def __init__(self, seed: int = 0, labelled: bool = False) -> None:
        self.seed = seed
        self.labelled = labelled

    def __call__(self, scores: pd.DataFrame) -> pd.DataFrame:
        """The labelled (or unlabelled) patches, shuffled with ``seed``."""
        df = scores[scores["labelled"] == self.labelled]
        return df.sample(frac=1.0, random_state=self.seed)


def make_ranker(by: str, *, seed: int = 0, labelled: bool | None = None) -> Ranker:
    """``iou``, ``entropy``, ``disagreement``, ``mcdropout`` or ``random`` (random ranks unlabelled patches
    unless told)."""
    if by == "iou":
        return IoURanker()
    if by in UNCERTAINTIES:
        return UncertaintyRanker(by)
    if by == "random":
        return RandomRanker(seed, bool(labelled))
    raise ValueError(f"unknown ranking {by!r} (iou, entropy, disagreement, mcdropout, random)")


def scores_frame(project: Project, model: ModelRef = "active") -> pd.DataFrame:
    """All stored scores of a model version on the current grid, one row per patch (see :data:`COLUMNS`)."""
    row = project.models.resolve(model)
    gid = project.grid_id()
    q = (select(PatchScoreRow.patch_id, SlideRow.name, PatchRow.col, PatchRow.row, PatchRow.x, PatchRow.y,
                PatchRow.size, PatchScoreRow.labelled, PatchScoreRow.iou, PatchScoreRow.dice,
                PatchScoreRow.entropy, PatchScoreRow.disagreement, PatchScoreRow.label_version,
                PatchScoreRow.mcdropout)
         .join(PatchRow, PatchRow.id == PatchScoreRow.patch_id)
         .join(SlideRow, SlideRow.id == PatchRow.slide_id)
         .where(PatchScoreRow.model_id == row.id, PatchRow.grid_id == gid)
         .order_by(PatchScoreRow.patch_id))
    with project.store.read() as s:
        rows = s.execute(q).all()
    if not rows:
        raise NoModelError(f"model {row.id} has no stored predictions on the current grid "
                           "(predict with it first)")
    df = pd.DataFrame(rows, columns=COLUMNS)
    df["labelled"] = df["labelled"].astype(bool)
    df.attrs["model_id"] = row.id
    return df


def select_top(ranked: pd.DataFrame, fraction: float | None = 0.05, count: int | None = None,
               per_slide: bool = False) -> pd.DataFrame:
    """The head of a ranked frame: ``count`` rows, or ``ceil(fraction × n)`` (at least one when n > 0),
    over the whole frame or within each slide (then slides interleave in rank order)."""
    if count is not None and count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if count is None and (fraction is None or not 0.0 < fraction <= 1.0):
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")

    def take(df: pd.DataFrame) -> pd.DataFrame:
        n = count if count is not None else max(1, math.ceil(fraction * len(df))) if len(df) else 0  # type: ignore[operator]
        return df.head(n)

    if not per_slide:
        out = take(ranked)
    else:
        ranked = ranked.assign(_rank=np.arange(len(ranked)))
        out = pd.concat([take(g) for _, g in ranked.groupby("slide", sort=False)]) if len(ranked) else ranked
        out = out.sort_values("_rank").drop(columns="_rank")
    return out.assign(rank=np.arange(1, len(out) + 1))


def review_queue(project: Project, model: ModelRef = "active", *, by: str = "iou",
                 fraction: float | None = 0.05, count: int | None = None, per_slide: bool = False,
                 seed: int = 0) -> pd.DataFrame:
    """The patches to review next with ``model``'s stored scores (see :func:`make_ranker`, :func:`select_top`)."""
    ranker = make_ranker(by, seed=seed)
    scores = scores_frame(project, model)
    out = select_top(ranker(scores), fraction, count, per_slide)
    out.attrs["model_id"] = scores.attrs["model_id"]
    return out
