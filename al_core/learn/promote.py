"""Which model version becomes active: the new one and the active one, scored on the same fixed validation set.

After a run, both models predict the validation patches (:mod:`al_core.project.validation`) against the current
labels; the new version becomes active only when its macro IoU is not worse than the active model's by more
than the project's tolerance (:data:`DEFAULT_TOLERANCE`, a setting). The figures, the decision and its reason
are stored with the new model (``metrics["evaluation"]``), so the app and ``slideloop models list`` show them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import torch

from al_core.learn.checkpoint import load_model
from al_core.learn.metrics import confusion, scores
from al_core.learn.model import ModelConfig, preprocess
from al_core.project.scale import config_scale
from al_core.project.schema import ModelRow

if TYPE_CHECKING:
    from al_core.project.project import Project

#: how much lower (macro IoU, absolute) a new version may score on the validation set and still be promoted.
#: A 1-epoch round on a few dozen validation patches moves macro IoU by about ±0.01 between seeds; 0.02
#: lets such noise through (the loop keeps moving) and stops real regressions such as 0.785 → 0.450.
DEFAULT_TOLERANCE = 0.02
#: ``meta`` key of the project's tolerance (a number as JSON)
TOLERANCE_KEY = "promotion_tolerance"


@dataclass(frozen=True)
class Evaluation:
    """A new version against the active one on the same validation patches."""

    model_id: int
    score: float | None
    active_id: int | None
    active_score: float | None
    patches: int
    tolerance: float
    promoted: bool
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """Plain data (as stored in the model row's metrics)."""
        return asdict(self)


def tolerance(project: Project) -> float:
    """The project's promotion tolerance."""
    text = project.store.get_meta(TOLERANCE_KEY)
    return float(json.loads(text)) if text else DEFAULT_TOLERANCE


def set_tolerance(project: Project, value: float) -> None:
    """Set the project's promotion tolerance (macro IoU, 0–1)."""
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"the promotion tolerance is a macro IoU difference in [0, 1], got {value}")
    with project.store.write() as s:
        project.store.set_meta(s, TOLERANCE_KEY, value)


def score_model(checkpoint: Path, images: npt.NDArray[np.uint8], masks: npt.NDArray[np.uint8],
                device: torch.device, batch_size: int = 8) -> tuple[float, ModelConfig]:
    """Macro IoU (pooled confusion) of a checkpoint on ``images`` (N, H, W, 3) against ``masks`` (channels)."""
    net, config = load_model(checkpoint)
    net.to(device)
    cm = np.zeros((config.num_classes, config.num_classes), dtype=np.int64)
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(images[i:i + batch_size]).to(device).permute(0, 3, 1, 2)
            pred = net(preprocess(x, config)).argmax(1).cpu().numpy()
            cm += confusion(masks[i:i + batch_size], pred, config.num_classes, config.ignore_index)
    return float(scores(cm)["macro_iou"]), config


def evaluate_and_promote(project: Project, model_id: int, checkpoint: Path, images: npt.NDArray[np.uint8],
                         masks: npt.NDArray[np.uint8], device: torch.device) -> Evaluation:
    """Score the new version and the active one on the validation patches; activate the new one if not worse."""
    tol = tolerance(project)
    active = project.models.active()
    n = len(images)
    score, config = score_model(checkpoint, images, masks, device) if n else (None, None)
    active_score = None
    if active is None:
        promoted, reason = True, "the project had no active model"
    elif not n:
        promoted, reason = False, (f"no validation patches to compare it with model {active.id} on; "
                                   "activate it yourself if it is better")
    else:
        comparable, why = _comparable(project, active, config)
        if not comparable:
            promoted, reason = True, f"model {active.id} cannot be scored on this grid ({why})"
        else:
            active_score = score_model(project.models.checkpoint(active), images, masks, device)[0]
            assert score is not None
            promoted = score >= active_score - tol
            verdict = "not worse than" if promoted else "worse than"
            reason = (f"validation IoU {score:.3f} vs {active_score:.3f} of model {active.id} on the same {n} "
                      f"patches: {verdict} it (tolerance {tol:g})")
    ev = Evaluation(model_id, score, active.id if active else None, active_score, n, tol, promoted, reason)
    with project.store.write() as s:
        row = s.get(ModelRow, model_id)
        assert row is not None
        row.metrics = json.dumps(json.loads(row.metrics or "{}") | {"evaluation": ev.to_dict()})
        if promoted:
            project.models.activate(model_id, by="validation", reason=reason, chosen=False, session=s)
    return ev


def _comparable(project: Project, active: ModelRow, config: ModelConfig | None) -> tuple[bool, str]:
    """Whether the active model reads the validation patches as it was trained (same scale, same classes)."""
    if config is None or active.checkpoint is None:
        return False, "no checkpoint"
    theirs = ModelConfig.from_dict(json.loads(active.config))
    mine_scale = config_scale(config.target_mpp, config.downsample, config.uncalibrated)
    their_scale = config_scale(theirs.target_mpp, theirs.downsample, theirs.uncalibrated)
    if their_scale is not None and mine_scale is not None and not their_scale.same_as(mine_scale):
        return False, f"it was trained at {their_scale.describe()}"
    if theirs.class_idx != config.class_idx:
        return False, "it predicts another class set"
    if not project.models.checkpoint(active).is_file():
        return False, "its checkpoint file is missing"
    return True, ""
