"""The seed paper's metric set from the stored per-patch confusions of a model version."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import numpy as np

from al_core.errors import NoModelError
from al_core.project.models import ModelRef
from al_core.project.schema import PatchScoreRow

if TYPE_CHECKING:
    from al_core.project.project import Project


def stored_metrics(project: Project, model: ModelRef = "active", *, test_slides: list[str] | None = None,
                   test_fraction: float = 0.0, seed: int = 0) -> dict[str, Any]:
    """The paper's metric set from the confusions stored by :func:`predict` (labelled patches only),
    per patch → per slide → over slides, for all slides and for a slide-level train/test split."""
    from sqlalchemy import select

    from al_core.learn.metrics import aggregate, split_slides
    from al_core.learn.model import ModelConfig
    from al_core.project.schema import PatchRow, SlideRow

    row = project.models.resolve(model)
    config = ModelConfig.from_dict(json.loads(row.config))
    q = (select(SlideRow.name, SlideRow.id, PatchScoreRow.confusion, PatchScoreRow.label_version)
         .join(PatchRow, PatchRow.id == PatchScoreRow.patch_id).join(SlideRow, SlideRow.id == PatchRow.slide_id)
         .where(PatchScoreRow.model_id == row.id, PatchScoreRow.confusion.is_not(None),
                PatchRow.grid_id == project.grid_id()))
    with project.store.read() as s:
        rows = s.execute(q).all()
    if not rows:
        raise NoModelError(f"model {row.id} has no scored labelled patches on the current grid "
                           "(predict with it after labelling)")
    current = {sid: project.labels.version(sid) for sid in {r[1] for r in rows}}
    stale = sum(1 for r in rows if r[3] != current[r[1]])
    names = [r[0] for r in rows]
    cms = np.asarray([json.loads(r[2] or "[]") for r in rows], dtype=np.int64)
    train, test = split_slides(names, test_fraction, seed, test_slides)
    out: dict[str, Any] = {"model_id": row.id, "classes": list(config.class_names), "train_slides": train,
                           "test_slides": test, "stale_patches": stale}
    for part, members in (("all", set(names)), ("train", set(train)), ("test", set(test))):
        keep = [i for i, n in enumerate(names) if n in members]
        out[part] = aggregate([names[i] for i in keep], cms[keep], config.class_names) if keep else None
    return out
