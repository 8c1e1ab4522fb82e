"""Object-level metrics of a model version on a project's labelled patches, per slide, with bootstrap intervals.

The stored probability maps are reduced (``predict --factor``), too coarse for nuclei, so this re-runs the
model on the labelled patches at full resolution. Per patch, the label and the prediction of each asked class
become instance maps (:func:`al_core.learn.object_metrics.instances`; ignore pixels are blanked in both);
patches where neither has an object of the class are skipped (they would score as perfect). Slide figures are
means over its patches with a bootstrap interval over patches; the overall figure is the mean over slides with
an interval over slides (over patches when there is one slide). Objects cut by a patch edge count as they lie
in the patch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import torch

from al_core.errors import NoModelError
from al_core.learn.checkpoint import load_model
from al_core.learn.dataset import label_masks, open_cache
from al_core.learn.device import pick_device
from al_core.learn.model import ModelConfig, check_classes, preprocess
from al_core.learn.object_metrics import bootstrap_ci, object_scores
from al_core.project.models import ModelRef

if TYPE_CHECKING:
    from al_core.project.project import Project

#: the per-object figures reported (F1 at IoU 0.5; Hausdorff in patch pixels)
OBJECT_METRICS = ("aji", "f1", "object_dice", "object_hausdorff")


def object_metrics(project: Project, model: ModelRef = "latest", classes: Sequence[str] | None = None, *,
                   n_boot: int = 2000, seed: int = 0, batch_size: int = 8, device: str = "auto") -> dict[str, Any]:
    """AJI, object F1, object Dice and object Hausdorff per class → per slide → over slides (see the module
    docstring). ``classes``: class names (default: every class but the first, the background)."""
    row = project.models.resolve(model)
    ckpt = project.models.checkpoint(row)
    net, config = load_model(ckpt)
    check_classes(config, project.classes(), ckpt)
    channels = _channels(config, classes)
    labelled = sorted(project.labelled_patch_ids())
    if not labelled:
        raise NoModelError(f"{project.root}: no labelled patches to score model {row.id} against")
    dev = pick_device(device)
    net.to(dev)
    cache = open_cache(project)
    slide_names = {s.id: s.name for s in project.slides()}
    per: dict[str, dict[str, list[dict[str, Any]]]] = {config.class_names[c]: {} for c in channels}
    for start in range(0, len(labelled), batch_size):
        ids = labelled[start:start + batch_size]
        rows = [cache.patch(p) for p in ids]
        masks = label_masks(rows, project.labels.annotations, config)
        pred = _argmax(net, cache.get(ids), config, dev)
        for k, p in enumerate(rows):
            ignore = masks[k] == config.ignore_index
            for c in channels:
                lab, prd = (masks[k] == c) & ~ignore, (pred[k] == c) & ~ignore
                if lab.any() or prd.any():
                    per[config.class_names[c]].setdefault(slide_names[p.slide_id], []).append(
                        object_scores(lab, prd))
    return {"model_id": row.id, "metrics": list(OBJECT_METRICS),
            "classes": {name: _summarise(by_slide, n_boot, seed) for name, by_slide in per.items()}}


def _channels(config: ModelConfig, classes: Sequence[str] | None) -> list[int]:
    if not classes:
        return list(range(1, config.num_classes))
    unknown = [c for c in classes if c not in config.class_names]
    if unknown:
        raise ValueError(f"no class {', '.join(map(repr, unknown))} in the model (classes: "
                         f"{', '.join(config.class_names)})")
    return [config.class_names.index(c) for c in classes]


def _argmax(net: torch.nn.Module, images: npt.NDArray[np.uint8], config: ModelConfig,
            dev: torch.device) -> npt.NDArray[np.int64]:
    x = preprocess(torch.from_numpy(images).to(dev).permute(0, 3, 1, 2), config)
    with torch.inference_mode():
        out: npt.NDArray[np.int64] = net(x).argmax(1).cpu().numpy()
    return out


def _summarise(by_slide: dict[str, list[dict[str, Any]]], n_boot: int, seed: int) -> dict[str, Any]:
    slides: dict[str, Any] = {}
    for name, scores in sorted(by_slide.items()):
        slides[name] = {m: _ci([s[m] for s in scores], n_boot, seed) for m in OBJECT_METRICS}
        slides[name] |= {"patches": len(scores), "objects_label": sum(s["objects_label"] for s in scores),
                         "objects_pred": sum(s["objects_pred"] for s in scores)}
    overall: dict[str, Any]
    if len(slides) >= 2:
        overall = {m: _ci([v[m]["mean"] for v in slides.values()], n_boot, seed) for m in OBJECT_METRICS}
        over = "slides"
    else:
        every = [s for scores in by_slide.values() for s in scores]
        overall = {m: _ci([s[m] for s in every], n_boot, seed) for m in OBJECT_METRICS}
        over = "patches"
    overall |= {"slides": len(slides), "patches": sum(v["patches"] for v in slides.values()), "ci_over": over}
    return {"overall": overall, "slides": slides}


def _ci(values: list[float], n_boot: int, seed: int) -> dict[str, float]:
    mean, lo, hi = bootstrap_ci(values, n_boot, seed)
    return {"mean": mean, "low": lo, "high": hi}
