"""Segmentation metrics of the seed paper, pure numpy: per-patch confusion → per-patch scores → per slide → overall.

For a confusion matrix ``cm`` (rows: label, columns: prediction; ignore pixels never counted), with
``tp_c = cm[c, c]``, ``support_c = Σ_j cm[c, j]`` (label pixels), ``pred_c = Σ_i cm[i, c]``:

- micro pixel accuracy ``Σ tp / Σ cm``; macro pixel accuracy ``mean_c tp_c / support_c`` over labelled classes;
- ``IoU_c = tp_c / (support_c + pred_c - tp_c)``, ``Dice_c = 2 tp_c / (support_c + pred_c)``, each over
  classes present in the label or the prediction (a class absent from both has no score, not 0 or 1);
- macro IoU = mean of IoU_c; weighted IoU = Σ support_c IoU_c / Σ support_c.

Dataset figures are computed per patch, averaged per slide, then averaged over slides (NaN-aware: a
class absent from a patch does not count for that patch).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

IntArray = npt.NDArray[np.int64]


def confusion(label: npt.ArrayLike, pred: npt.ArrayLike, num_classes: int, ignore_index: int = 255) -> IntArray:
    """``(C, C)`` pixel counts of (label, prediction); label pixels equal to ``ignore_index`` are skipped."""
    lab = np.asarray(label).ravel().astype(np.int64)
    prd = np.asarray(pred).ravel().astype(np.int64)
    if lab.shape != prd.shape:
        raise ValueError(f"label and prediction sizes differ: {lab.size} vs {prd.size}")
    keep = lab != ignore_index
    lab, prd = lab[keep], prd[keep]
    if lab.size and (lab.max() >= num_classes or lab.min() < 0 or prd.max() >= num_classes or prd.min() < 0):
        raise ValueError(f"class values outside 0..{num_classes - 1} (and ignore {ignore_index})")
    return np.bincount(lab * num_classes + prd, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class(cm: npt.ArrayLike) -> dict[str, npt.NDArray[np.float64]]:
    """IoU, Dice and accuracy (recall) per class; NaN where the class is in neither label nor prediction."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    support = cm.sum(1)
    pred = cm.sum(0)
    union = support + pred - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        dice = np.where(support + pred > 0, 2 * tp / (support + pred), np.nan)
        acc = np.where(support > 0, tp / support, np.nan)
    return {"iou": iou, "dice": dice, "accuracy": acc, "support": support}


def scores(cm: npt.ArrayLike) -> dict[str, Any]:
    """The paper's metric set for one confusion matrix (see the module docstring for the formulas)."""
    cm = np.asarray(cm, dtype=np.float64)
    pc = per_class(cm)
    total = cm.sum()
    support = pc["support"]
    iou = pc["iou"]
    present = ~np.isnan(iou)
    return {
        "pixel_accuracy": float(np.trace(cm) / total) if total else float("nan"),
        "mean_accuracy": _nanmean(pc["accuracy"]),
        "macro_iou": _nanmean(iou),
        "weighted_iou": float(np.sum(support[present] * iou[present]) / support.sum()) if support.sum() else float("nan"),
        "iou": pc["iou"].tolist(),
        "dice": pc["dice"].tolist(),
        "macro_dice": _nanmean(pc["dice"]),
    }


def patch_iou(cm: npt.ArrayLike) -> float:
    """One number for ranking a patch: macro IoU over classes present in its label or prediction (1.0 if the
    patch has no counted pixel, i.e. nothing to disagree on)."""
    v = _nanmean(per_class(cm)["iou"])
    return 1.0 if np.isnan(v) else v


def patch_dice(cm: npt.ArrayLike) -> float:
    """A patch's macro Dice over classes present in its label or prediction (1.0 if no pixel is counted)."""
    v = _nanmean(per_class(cm)["dice"])
    return 1.0 if np.isnan(v) else v


_SCALARS = ("pixel_accuracy", "mean_accuracy", "macro_iou", "weighted_iou", "macro_dice")


def aggregate(slides: Sequence[str], cms: Sequence[npt.ArrayLike] | npt.NDArray[np.int64],
              class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Average per-patch scores per slide, then over slides.

    ``slides[i]`` names the slide of the patch whose confusion matrix is ``cms[i]``. Returns ``{"overall":
    {...}, "slides": {name: {...}}, "patches": n}``; per-class lists become ``{class name: value}``.
    """
    if len(slides) != len(cms):
        raise ValueError(f"{len(slides)} slide names for {len(cms)} confusion matrices")
    if not len(cms):
        raise ValueError("no patches to score")
    per_patch = [scores(cm) for cm in cms]
    n_cls = len(per_patch[0]["iou"])
    names = list(class_names) if class_names is not None else [str(i) for i in range(n_cls)]
    by_slide: dict[str, list[int]] = {}
    for i, s in enumerate(slides):
        by_slide.setdefault(s, []).append(i)

    def mean_of(idx: Iterable[int]) -> dict[str, Any]:
        idx = list(idx)
        out: dict[str, Any] = {k: _nanmean([per_patch[i][k] for i in idx]) for k in _SCALARS}
        for key in ("iou", "dice"):
            arr = np.array([per_patch[i][key] for i in idx], dtype=np.float64)
            out[key] = {n: _nanmean(arr[:, c]) for c, n in enumerate(names)}
        out["patches"] = len(idx)
        return out

    slide_scores = {s: mean_of(idx) for s, idx in by_slide.items()}
    overall: dict[str, Any] = {k: _nanmean([v[k] for v in slide_scores.values()]) for k in _SCALARS}
    for key in ("iou", "dice"):
        overall[key] = {n: _nanmean([v[key][n] for v in slide_scores.values()]) for n in names}
    overall["slides"] = len(slide_scores)
    overall["patches"] = len(cms)
    return {"overall": overall, "slides": slide_scores, "patches": len(cms)}


def split_slides(slides: Sequence[str], test_fraction: float = 0.0, seed: int = 0,
                 test: Sequence[str] | None = None) -> tuple[list[str], list[str]]:
    """Split slide names into (train, test): the ``test`` names if given, else a seeded random fraction."""
    names = sorted(set(slides))
    if test is not None:
        unknown = set(test) - set(names)
        if unknown:
            raise ValueError(f"test slides {sorted(unknown)} are not in the project (slides: {names})")
        chosen = set(test)
    else:
        if not 0.0 <= test_fraction < 1.0:
            raise ValueError(f"test fraction must be in [0, 1), got {test_fraction}")
        k = int(round(test_fraction * len(names)))
        if test_fraction > 0 and len(names) > 1:
            k = max(1, min(k, len(names) - 1))
        rng = np.random.default_rng(seed)
        chosen = set(rng.permutation(names)[:k].tolist()) if k else set()
    return [n for n in names if n not in chosen], [n for n in names if n in chosen]


def _nanmean(values: Iterable[float] | npt.NDArray[np.float64]) -> float:
    arr = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=np.float64)
    if arr.size == 0 or np.all(np.isnan(arr)):
        return float("nan")
    return float(np.nanmean(arr))
