"""Object-level metrics for instance-like classes (nuclei, glands), pure numpy/scipy/scikit-image.

Objects are the 8-connected components of a class's binary mask (label or prediction), numbered 1..n (0:
background). With ``G_i`` the label objects and ``S_j`` the predicted ones:

- **AJI** (aggregated Jaccard index, Kumar et al. 2017): each ``G_i`` is paired with the ``S_j`` of highest IoU;
  ``AJI = Σ|G_i ∩ S*| / (Σ|G_i ∪ S*| + Σ|S_j| over predicted objects never paired)``.
- **object F1** at IoU 0.5: a ``G_i`` and an ``S_j`` match when their IoU exceeds 0.5 (at most one partner each,
  by construction); ``F1 = 2 TP / (2 TP + FP + FN)``.
- **object Dice** and **object Hausdorff** (the GlaS challenge, Sirinukunwattana et al. 2017):
  ``½ [Σ_i γ_i D(G_i, S*(G_i)) + Σ_j σ_j D(G*(S_j), S_j)]`` with ``γ_i = |G_i| / Σ|G|``, ``σ_j = |S_j| / Σ|S|``;
  the partner ``*`` is the object of largest overlap (Dice 0 when none overlaps; for Hausdorff the object of
  smallest Hausdorff distance). A side with no objects at all costs the image diagonal (Hausdorff).

Empty label and empty prediction score as perfect (1, 1, 1, 0); one side empty scores 0 (Hausdorff: diagonal).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.spatial.distance import directed_hausdorff  # type: ignore[import-untyped]  # scipy ships no stubs
from skimage.measure import label as connected

Labels = npt.NDArray[np.int32]


def instances(mask: npt.ArrayLike) -> Labels:
    """Connected objects of a binary mask, numbered 1..n (8-connectivity)."""
    return np.asarray(connected(np.asarray(mask, dtype=bool), connectivity=2), dtype=np.int32)


def _overlap(gt: Labels, pred: Labels) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """(intersection matrix ``(n_g+1, n_s+1)``, object areas of gt, of pred) — index 0 is background."""
    ng, ns = int(gt.max()), int(pred.max())
    inter = np.bincount(gt.ravel().astype(np.int64) * (ns + 1) + pred.ravel(), minlength=(ng + 1) * (ns + 1))
    inter = inter.reshape(ng + 1, ns + 1)
    return inter, inter.sum(1), inter.sum(0)


def aji(gt: Labels, pred: Labels) -> float:
    """Aggregated Jaccard index of two instance maps."""
    inter, ag, ap = _overlap(gt, pred)
    ng, ns = len(ag) - 1, len(ap) - 1
    if ng == 0 and ns == 0:
        return 1.0
    if ng == 0 or ns == 0:
        return 0.0
    i = inter[1:, 1:].astype(np.float64)
    union = ag[1:, None] + ap[None, 1:] - i
    iou = i / union
    best = iou.argmax(1)
    hit = i[np.arange(ng), best] > 0
    c = float(i[np.arange(ng), best][hit].sum())
    u = float(union[np.arange(ng), best][hit].sum() + ag[1:][~hit].sum())
    used = np.zeros(ns, dtype=bool)
    used[best[hit]] = True
    u += float(ap[1:][~used].sum())
    return c / u if u else 1.0


def object_f1(gt: Labels, pred: Labels, threshold: float = 0.5) -> dict[str, float]:
    """Detection F1, precision and recall: a pair matches when its IoU exceeds ``threshold`` (>= 0.5 keeps
    matches one-to-one)."""
    inter, ag, ap = _overlap(gt, pred)
    ng, ns = len(ag) - 1, len(ap) - 1
    i = inter[1:, 1:].astype(np.float64)
    iou = i / (ag[1:, None] + ap[None, 1:] - i) if ng and ns else np.zeros((ng, ns))
    tp = int((iou > threshold).sum())
    fp, fn = ns - tp, ng - tp
    if ng == 0 and ns == 0:
        return {"f1": 1.0, "precision": 1.0, "recall": 1.0, "tp": 0, "fp": 0, "fn": 0}
    return {"f1": 2 * tp / (2 * tp + fp + fn), "precision": tp / ns if ns else 0.0,
            "recall": tp / ng if ng else 0.0, "tp": tp, "fp": fp, "fn": fn}


def object_dice(gt: Labels, pred: Labels) -> float:
    """GlaS object Dice: area-weighted Dice of each object with its largest-overlap partner, both ways."""
    inter, ag, ap = _overlap(gt, pred)
    ng, ns = len(ag) - 1, len(ap) - 1
    if ng == 0 and ns == 0:
        return 1.0
    if ng == 0 or ns == 0:
        return 0.0
    i = inter[1:, 1:].astype(np.float64)
    dice = 2 * i / (ag[1:, None] + ap[None, 1:])
    g_side = dice[np.arange(ng), i.argmax(1)]  # 0 where the best overlap is 0
    s_side = dice[i.argmax(0), np.arange(ns)]
    return float(0.5 * (np.sum(ag[1:] / ag[1:].sum() * g_side) + np.sum(ap[1:] / ap[1:].sum() * s_side)))


def _points(lab: Labels, k: int) -> npt.NDArray[np.int64]:
    return np.argwhere(lab == k)


def _hausdorff(a: npt.NDArray[np.int64], b: npt.NDArray[np.int64]) -> float:
    return float(max(directed_hausdorff(a, b)[0], directed_hausdorff(b, a)[0]))


def object_hausdorff(gt: Labels, pred: Labels) -> float:
    """GlaS object Hausdorff distance in pixels (lower is better)."""
    inter, ag, ap = _overlap(gt, pred)
    ng, ns = len(ag) - 1, len(ap) - 1
    if ng == 0 and ns == 0:
        return 0.0
    if ng == 0 or ns == 0:
        return float(np.hypot(*gt.shape))
    gp = [_points(gt, k) for k in range(1, ng + 1)]
    sp = [_points(pred, k) for k in range(1, ns + 1)]
    i = inter[1:, 1:]

    def partner_dist(src: list[npt.NDArray[np.int64]], dst: list[npt.NDArray[np.int64]],
                     ov: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
        out = np.empty(len(src))
        for k, pts in enumerate(src):
            if ov[k].max() > 0:
                out[k] = _hausdorff(pts, dst[int(ov[k].argmax())])
            else:
                out[k] = min(_hausdorff(pts, d) for d in dst)
        return out

    hg = partner_dist(gp, sp, i)
    hs = partner_dist(sp, gp, i.T)
    return float(0.5 * (np.sum(ag[1:] / ag[1:].sum() * hg) + np.sum(ap[1:] / ap[1:].sum() * hs)))


def object_scores(label: npt.ArrayLike, pred: npt.ArrayLike) -> dict[str, Any]:
    """All object metrics of one binary label/prediction pair (instances by connected components)."""
    g, s = instances(label), instances(pred)
    f1 = object_f1(g, s)
    return {"aji": aji(g, s), "f1": f1["f1"], "precision": f1["precision"], "recall": f1["recall"],
            "object_dice": object_dice(g, s), "object_hausdorff": object_hausdorff(g, s),
            "objects_label": int(g.max()), "objects_pred": int(s.max())}


def bootstrap_ci(values: npt.ArrayLike, n_boot: int = 2000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the mean and its percentile bootstrap interval (NaNs dropped; NaN when empty)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, (n_boot, v.size))].mean(1)
    a = (1 - level) / 2
    return float(v.mean()), float(np.quantile(means, a)), float(np.quantile(means, 1 - a))
