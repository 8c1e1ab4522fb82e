"""Learning-rate schedules stepped once per optimizer step: linear warm-up, then cosine decay.

From scratch, a U-Net at a high learning rate diverges in its first steps (BatchNorm statistics are still
random); a short linear warm-up avoids that, and a cosine decay to a small floor lets the last epochs settle.
"""

from __future__ import annotations

import math
import time

import torch


def warmup_cosine_factor(step: int, total: int, warmup: int, floor: float = 0.01) -> float:
    """The multiplier of the base learning rate at ``step`` (0-based) of ``total``: linear from ``1/warmup`` up
    to 1 over ``warmup`` steps, then cosine down to ``floor`` at ``total`` (and ``floor`` after it)."""
    if total < 1 or warmup < 0 or not 0.0 <= floor <= 1.0:
        raise ValueError(f"bad schedule: total {total}, warmup {warmup}, floor {floor}")
    if step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    t = min(1.0, (step - warmup) / span)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_fraction: float = 0.05,
                  floor: float = 0.01, max_seconds: float | None = None) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` of :func:`warmup_cosine_factor` over ``total_steps`` (warm-up: a share of them).

    With ``max_seconds`` (a wall-time budget) the decay follows whichever runs out first, steps or time, so a
    run stopped by its budget still ends on a small learning rate rather than mid-way down the cosine.
    """
    total = max(1, total_steps)
    warmup = max(1, round(warmup_fraction * total)) if warmup_fraction > 0 else 0
    t0 = time.perf_counter()

    def factor(step: int) -> float:
        if max_seconds is not None and step >= warmup:
            by_time = warmup + int((time.perf_counter() - t0) / max_seconds * (total - warmup))
            step = max(step, by_time)
        return warmup_cosine_factor(step, total, warmup, floor)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
