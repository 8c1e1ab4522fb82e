"""Training recipes: the loss, optimizer, schedule, augmentation and checkpoint rule a run uses, by name.

``default`` is built to converge from scratch in minutes on a CPU: cross-entropy + Dice (ignore pixels
excluded), AdamW at 1e-3 with a 5 % linear warm-up and a cosine decay, the paper's augmentation plus HED
stain jitter, an ImageNet-pretrained encoder when its weights are already on this machine (never downloaded
by default), and the best checkpoint chosen by validation IoU. A retrain from the last model (the loop's
rounds) continues at a tenth of that rate with no warm-up: the parent's weights and Adam moments are already
settled, and a fresh warm-up to 1e-3 would throw away part of what the last round learned. ``paper`` is the NoCodeSeg/DeepMIB setting:
cross-entropy, Adam 5e-5 with L2 1e-4 at a constant rate, the paper's augmentation, validation loss.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from al_core.learn.augment import PaperAugment
from al_core.learn.losses import DiceCELoss
from al_core.learn.schedule import warmup_cosine
from al_core.learn.stain_aug import HEDJitter


@dataclass(frozen=True)
class Recipe:
    """One named training recipe (see the module docstring); ``monitor`` is ``loss`` or ``iou`` (validation)."""

    name: str
    optimizer: str
    lr: float
    weight_decay: float
    loss: str
    schedule: str
    warmup_fraction: float = 0.05
    stain_jitter: bool = False
    pretrained_if_cached: bool = False
    monitor: str = "loss"
    #: a run that continues a parent model: its peak rate is ``lr`` times this, with this warm-up share
    continue_lr_factor: float = 1.0
    continue_warmup_fraction: float = 0.0

    def base_lr(self, continuing: bool) -> float:
        """The peak learning rate of a run from scratch or of one that continues a parent."""
        return self.lr * (self.continue_lr_factor if continuing else 1.0)


RECIPES = {
    "default": Recipe("default", "adamw", 1e-3, 1e-2, "dice_ce", "warmup_cosine", stain_jitter=True,
                      pretrained_if_cached=True, monitor="iou", continue_lr_factor=0.1),
    "paper": Recipe("paper", "adam", 5e-5, 1e-4, "ce", "constant"),
}


def get_recipe(name: str) -> Recipe:
    """The recipe called ``name``; ``ValueError`` naming the known ones otherwise."""
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown recipe {name!r} (known: {', '.join(RECIPES)})") from None


def make_optimizer(recipe: Recipe, params: Iterable[torch.nn.Parameter], lr: float | None,
                   weight_decay: float | None, continuing: bool = False) -> torch.optim.Optimizer:
    """The recipe's optimizer; ``lr``/``weight_decay`` override its values when given."""
    lr = recipe.base_lr(continuing) if lr is None else lr
    wd = recipe.weight_decay if weight_decay is None else weight_decay
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    return torch.optim.Adam(params, lr=lr, weight_decay=wd)


def make_criterion(recipe: Recipe, ignore_index: int, weight: torch.Tensor | None = None) -> torch.nn.Module:
    """The recipe's loss (class ``weight`` applies to its cross-entropy term)."""
    if recipe.loss == "dice_ce":
        return DiceCELoss(ignore_index, weight=weight)
    return torch.nn.CrossEntropyLoss(weight=weight, ignore_index=ignore_index)


def make_scheduler(recipe: Recipe, optimizer: torch.optim.Optimizer, total_steps: int,
                   max_seconds: float | None = None,
                   continuing: bool = False) -> torch.optim.lr_scheduler.LRScheduler | None:
    """Warm-up + cosine over ``total_steps`` (or over ``max_seconds`` of wall time, whichever ends first);
    ``None`` for a constant rate. A run that continues a parent uses the recipe's continuation warm-up."""
    if recipe.schedule == "constant":
        return None
    warmup = recipe.continue_warmup_fraction if continuing else recipe.warmup_fraction
    return warmup_cosine(optimizer, total_steps, warmup, max_seconds=max_seconds)


class RecipeAugment:
    """The paper's augmentation, then (for recipes that ask) HED stain jitter on half of the patches."""

    def __init__(self, recipe: Recipe, seed: int | None = None) -> None:
        self.paper = PaperAugment(seed=seed)
        self.stain = HEDJitter(p=0.5) if recipe.stain_jitter else None
        if self.stain is not None and seed is not None:
            self.stain.set_random_seed(seed * 7919 + 1)

    def __call__(self, image: npt.NDArray[np.uint8],
                 mask: npt.NDArray[np.uint8]) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
        """The augmented patch and its mask (stain jitter changes colour only)."""
        image, mask = self.paper(image, mask)
        if self.stain is not None:
            image = self.stain(image=image)["image"]
        return image, mask


def cached_encoder_weights(encoder: str, cache_dir: str | None = None) -> str | None:
    """``"imagenet"`` when the ImageNet weights smp would load for ``encoder`` are already in the local
    Hugging Face cache (then building the model reads them from disk), else ``None``. Never downloads."""
    from huggingface_hub import try_to_load_from_cache
    from segmentation_models_pytorch.encoders import encoders

    settings = encoders.get(encoder, {}).get("pretrained_settings", {}).get("imagenet")
    if not isinstance(settings, dict) or "repo_id" not in settings:
        return None
    revision = settings.get("revision")
    found = [try_to_load_from_cache(settings["repo_id"], f, cache_dir=cache_dir, revision=revision)
             for f in ("config.json", "model.safetensors")]
    return "imagenet" if all(isinstance(f, str) for f in found) else None
