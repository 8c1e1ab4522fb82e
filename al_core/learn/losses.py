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
