"""Scores that follow the labels: a saved correction re-scores its patches against the stored predictions, and
the queue can tell which patches' labels changed since a model predicted them.

Re-scoring compares the current label with the *stored* prediction (the argmax of the reduced probability maps,
upsampled by repetition: exactly the prediction the review app draws and "accept" takes), so it needs no model
and no GPU and takes milliseconds per patch. A score row keeps the label version it was predicted at; only its
agreement (IoU, Dice, confusion, labelled) is updated.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from sqlalchemy import or_, select, update

from al_core._constants import IGNORE_INDEX
from al_core.errors import ProjectError
from al_core.learn.metrics import confusion, patch_dice, patch_iou
from al_core.project.schema import AnnotationRow, ModelRow, PatchRow, PatchScoreRow

if TYPE_CHECKING:
    from shapely.geometry.base import BaseGeometry

    from al_core.project.project import Project


def rescore_patches(project: Project, patch_ids: Iterable[int], since: int | None = None) -> int:
    """Re-score ``patch_ids`` against every model's stored prediction of them; returns the rows updated.

    ``since``: the label version before the edit. A patch whose label is the same then and now (a neighbour the
    region only grazed) and whose labelled flag holds keeps its predict-time score, which the reduced stored maps
    could only move by their rounding. Patches a model has no stored prediction for are left alone."""
    ids = sorted(set(patch_ids))
    if not ids:
        return 0
    with project.store.read() as s:
        scored = s.execute(select(PatchScoreRow.model_id, PatchScoreRow.patch_id, PatchScoreRow.labelled)
                           .where(PatchScoreRow.patch_id.in_(ids))).all()
        configs = {r.id: r.config for r in s.scalars(select(ModelRow).where(
            ModelRow.id.in_({m for m, _, _ in scored})))}
    patches = {p: project.patch(p) for p in {p for _, p, _ in scored}}
    labelled: set[int] = set()
    for sid in {p.slide_id for p in patches.values()}:
        labelled |= project.labelled_patch_ids(sid)
    masks = {pid: project.label_mask(p) for pid, p in patches.items()}
    same = {pid for pid, p in patches.items()
            if since is not None and np.array_equal(project.label_mask(p, since), masks[pid])}
    updates = [u for model_id, pid, was in scored if not (pid in same and bool(was) == (pid in labelled))
               and (u := _score(project, model_id, pid, configs[model_id],
                                masks[pid] if pid in labelled else None)) is not None]
    with project.store.write() as s:
        for u in updates:
            s.execute(update(PatchScoreRow).where(PatchScoreRow.model_id == u["model_id"],
                                                  PatchScoreRow.patch_id == u["patch_id"])
                      .values(labelled=u["labelled"], iou=u["iou"], dice=u["dice"], confusion=u["confusion"]))
    return len(updates)


def _score(project: Project, model_id: int, pid: int, config_json: str,
           mask: npt.NDArray[np.uint8] | None) -> dict[str, Any] | None:
    """The new agreement columns of one score row (``mask``: the patch's label, ``None`` when unlabelled);
    ``None`` when its stored prediction cannot be read or has another size (predict again to score it)."""
    key = {"model_id": model_id, "patch_id": pid}
    if mask is None:
        return key | {"labelled": False, "iou": None, "dice": None, "confusion": None}
    lut, n, ignore = _channels(config_json)
    label = lut[mask]
    try:
        pred = _stored_channels(project, model_id, pid, label.shape[0])
    except (ProjectError, OSError, ValueError):
        return None
    if pred.shape != label.shape:
        return None
    cm = confusion(label, pred, n, ignore)
    return key | {"labelled": True, "iou": patch_iou(cm), "dice": patch_dice(cm), "confusion": json.dumps(cm.tolist())}


def rescore_region(project: Project, slide_id: int, region: BaseGeometry | None, patch_id: int | None = None,
                   since: int | None = None) -> int:
    """Re-score the current grid's patches of a slide that ``region`` (level-0 px) touches, and ``patch_id``
    (a reviewed patch counts as labelled even where nothing was drawn); ``since``: see :func:`rescore_patches`."""
    import shapely

    from al_core.project.patches import patch_box, touched_by

    ids: set[int] = set()
    if region is not None:
        patches = project.patches(slide_id)
        hit = touched_by(patches, [region])
        near = [p for p in patches if p.id in hit]
        # a neighbour that only shares an edge with the region kept its label: leave its predict-time score
        overlap = shapely.area(shapely.intersection([patch_box(p) for p in near], region))
        ids = {p.id for p, a in zip(near, overlap, strict=True) if a > 0}
    return rescore_patches(project, ids | ({patch_id} if patch_id is not None else set()), since)


def _channels(config_json: str) -> tuple[npt.NDArray[np.uint8], int, int]:
    """From a model's stored config: project class → output channel table, channel count, ignore index
    (read from the JSON, as :meth:`ModelConfig.mask_lut` does, so re-scoring never imports torch)."""
    config = json.loads(config_json)
    ignore = int(config.get("ignore_index", IGNORE_INDEX))
    lut = np.full(256, ignore, dtype=np.uint8)
    for ch, idx in enumerate(config["class_idx"]):
        lut[int(idx)] = ch
    return lut, len(config["class_idx"]), ignore


def _stored_channels(project: Project, model_id: int, patch_id: int, size: int) -> npt.NDArray[np.int64]:
    """The stored prediction's argmax in model channels, repeated up to the patch's output size."""
    arg = project.predictions.probabilities(model_id, patch_id).argmax(0)
    k = size // arg.shape[0]
    return np.asarray(np.kron(arg, np.ones((k, k), dtype=np.int64)) if k > 1 else arg, dtype=np.int64)


def changed_since_prediction(project: Project, model_id: int) -> set[int]:
    """Patches of the current grid whose label differs from the label model ``model_id`` was scored against
    (its score rows' label version): the review queue marks them."""
    with project.store.read() as s:
        rows = s.execute(select(PatchRow, PatchScoreRow.label_version)
                         .join(PatchScoreRow, PatchScoreRow.patch_id == PatchRow.id)
                         .where(PatchScoreRow.model_id == model_id, PatchRow.grid_id == project.grid_id())).all()
    by_slide: dict[tuple[int, int], list[PatchRow]] = {}
    for patch, version in rows:
        if version is not None:
            by_slide.setdefault((patch.slide_id, int(version)), []).append(patch)
    out: set[int] = set()
    for (slide_id, version), patches in by_slide.items():
        if project.labels.version(slide_id) <= version:
            continue
        for patch in _near_changes(project, slide_id, version, patches):
            # an edit elsewhere re-adds the untouched rest of the polygons it cuts: only a differing mask counts
            if not np.array_equal(project.label_mask(patch, version), project.label_mask(patch)):
                out.add(patch.id)
    return out


def _near_changes(project: Project, slide_id: int, version: int, patches: list[PatchRow]) -> list[PatchRow]:
    """The patches whose square meets the bounding box of an annotation created or retired after ``version``."""
    with project.store.read() as s:
        boxes = np.array(s.execute(select(AnnotationRow.minx, AnnotationRow.miny, AnnotationRow.maxx,
                                          AnnotationRow.maxy).where(
            AnnotationRow.slide_id == slide_id,
            or_(AnnotationRow.created_version > version, AnnotationRow.retired_version > version))).all(),
                         dtype=np.float64).reshape(-1, 4)
    if not len(boxes):
        return []
    return [p for p in patches if np.any((boxes[:, 2] >= p.x) & (boxes[:, 0] <= p.x + p.size)
                                         & (boxes[:, 3] >= p.y) & (boxes[:, 1] <= p.y + p.size))]
