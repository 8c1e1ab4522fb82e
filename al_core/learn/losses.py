"""Loss helpers: class weights for imbalanced labels."""

from __future__ import annotations

import numpy as np
import torch


def median_frequency_weights(masks: np.ndarray, num_classes: int, ignore_index: int) -> torch.Tensor:
    """Median-frequency balancing: ``w_c = median(f) / f_c``, ``f_c`` = pixels of c / pixels of the patches
    that contain c (Eigen & Fergus 2015). Classes never seen get weight 0."""
    flat = masks.reshape(len(masks), -1)
    counts = np.stack([(flat == c).sum(1) for c in range(num_classes)], 1).astype(np.float64)  # (n, C)
    valid = (flat != ignore_index).sum(1).astype(np.float64)
    present = counts > 0
    denom = (valid[:, None] * present).sum(0)
    freq = np.where(denom > 0, counts.sum(0) / np.maximum(denom, 1), 0.0)
    seen = freq > 0
    w = np.zeros(num_classes)
    w[seen] = np.median(freq[seen]) / freq[seen]
    return torch.tensor(w, dtype=torch.float32)


class DiceCELoss(torch.nn.Module):
    """Cross-entropy plus soft Dice (``ce_weight · CE + dice_weight · (1 − mean Dice)``), ignore pixels excluded.

    Cross-entropy alone under-segments a small foreground class such as nuclei; the Dice term scores each class
    by overlap, so the rare class weighs as much as the background. Dice is taken over the whole batch per
    class (one sum over all pixels), averaged over the classes present in the label or the prediction.
    """

    def __init__(self, ignore_index: int, weight: torch.Tensor | None = None, ce_weight: float = 1.0,
                 dice_weight: float = 1.0, smooth: float = 1.0) -> None:
        super().__init__()
        self.ce = torch.nn.CrossEntropyLoss(weight=weight, ignore_index=ignore_index)
        self.ignore_index = ignore_index
        self.ce_weight, self.dice_weight, self.smooth = ce_weight, dice_weight, smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The combined loss of ``(N, C, H, W)`` logits against ``(N, H, W)`` class indices."""
        ce = self.ce(logits, target)
        valid = (target != self.ignore_index).unsqueeze(1)
        probs = torch.softmax(logits, 1) * valid
        onehot = torch.nn.functional.one_hot(target.where(valid[:, 0], 0), logits.shape[1]).permute(0, 3, 1, 2)
        onehot = onehot.to(probs.dtype) * valid
        inter = (probs * onehot).sum((0, 2, 3))
        denom = probs.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
        dice = (2 * inter + self.smooth) / (denom + self.smooth)
        present = onehot.sum((0, 2, 3)) > 0
        dice_loss = 1 - (dice[present].mean() if bool(present.any()) else dice.mean())
        total: torch.Tensor = self.ce_weight * ce + self.dice_weight * dice_loss
        return total
