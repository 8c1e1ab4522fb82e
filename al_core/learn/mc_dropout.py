"""MC-dropout uncertainty: several stochastic passes of the segmentation head, scored by mutual information.

The U-Net's decoder runs once; its output features (the segmentation head's input, caught by a forward
pre-hook during the ordinary forward pass) are passed through the head ``samples`` times under element-wise
dropout. The score per patch is the mean over pixels of the mutual information between prediction and
dropout mask (BALD: entropy of the mean probabilities minus the mean entropy of the samples), divided by
``log C`` so it lies in [0, 1]. Only the 1×1 head is repeated, so the cost is a small fraction of one
forward pass. The dropout masks are drawn from a generator seeded per batch (reproducible rankings) and
the global RNG is left alone.

Caveat, said where it matters: slideloop's models are trained without dropout, so this is test-time
dropout on the decoder features, not the Bayesian approximation of a network trained with dropout.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

#: dropout rate on the decoder features
DEFAULT_P = 0.2


@contextmanager
def head_input(net: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect the input of ``net.segmentation_head`` (the decoder output) of each forward pass inside."""
    head = getattr(net, "segmentation_head", None)
    if not isinstance(head, torch.nn.Module):
        raise ValueError("MC dropout needs a model with a 'segmentation_head' (an smp U-Net)")
    caught: list[torch.Tensor] = []

    def hook(_m: torch.nn.Module, args: tuple[Any, ...]) -> None:
        caught.append(args[0])

    handle = head.register_forward_pre_hook(hook)
    try:
        yield caught
    finally:
        handle.remove()


def mutual_information(probs: torch.Tensor) -> torch.Tensor:
    """BALD per patch from ``(T, B, C, H, W)`` sample probabilities: mean over pixels, divided by ``log C``."""
    eps = 1e-8
    mean = probs.mean(0)
    h_mean = -(mean * mean.clamp_min(eps).log()).sum(1)
    mean_h = -(probs * probs.clamp_min(eps).log()).sum(2).mean(0)
    score: torch.Tensor = ((h_mean - mean_h).clamp_min(0) / np.log(probs.shape[2])).mean((1, 2))
    return score


def mc_dropout_scores(net: torch.nn.Module, features: torch.Tensor, samples: int = 8, p: float = DEFAULT_P,
                      seed: int = 0, autocast: Callable[[], Any] | None = None) -> torch.Tensor:
    """Mutual information per patch from ``samples`` dropout passes of the head over ``features``."""
    if samples < 2 or not 0.0 < p < 1.0:
        raise ValueError(f"MC dropout needs at least 2 samples and 0 < p < 1, got {samples}, {p}")
    head: torch.nn.Module = net.segmentation_head  # type: ignore[assignment]  # checked by head_input
    gen = torch.Generator(device=features.device).manual_seed(seed)
    keep = 1.0 - p
    out = []
    with torch.inference_mode():
        for _ in range(samples):
            mask = torch.empty_like(features, dtype=torch.float32).bernoulli_(keep, generator=gen)
            x = features * (mask / keep).to(features.dtype)
            with autocast() if autocast is not None else torch.autocast("cpu", enabled=False):
                out.append(torch.softmax(head(x).float(), 1))
    return mutual_information(torch.stack(out))
