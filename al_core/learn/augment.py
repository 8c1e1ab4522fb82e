"""The seed paper's training augmentation (DeepMIB settings in NoCodeSeg), built from albumentations.

75 % of patches are eligible; on an eligible patch each augmentation below applies independently with
probability 0.3: left-right and top-bottom flips, a 90° or 270° rotation, scaling 1.0–1.1 along X, Y or both,
hue ±0.03 (fraction of the hue circle), saturation ±0.05, brightness ±0.1 (of the full range), contrast
0.9–1.1, Gaussian blur σ 0–0.5. Geometric transforms move the mask with nearest-neighbour interpolation, so
class indices (and the ignore index) are never blended.
"""

from __future__ import annotations

from typing import Any

import albumentations as A
import cv2
import numpy as np
import numpy.typing as npt

#: a σ of exactly 0 makes OpenCV derive σ from the kernel size; this is "no blur" in effect
_MIN_SIGMA = 1e-3


class Rotate90or270(A.RandomRotate90):  # type: ignore[misc]  # albumentations is untyped
    """Rotate by 90° or 270° (never 0° or 180°), as the paper lists them; the rest is albumentations'."""

    def get_params(self) -> dict[str, int]:
        """The number of quarter turns: 1 or 3, at random."""
        return {"factor": self.py_random.choice((1, 3))}


def paper_augmentation(p_eligible: float = 0.75, p_each: float = 0.3) -> A.Compose:
    """The paper's pipeline: ``p_eligible`` of samples enter it, each transform then fires with ``p_each``."""
    geo: dict[str, Any] = dict(interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST,
                               border_mode=cv2.BORDER_REFLECT_101, p=1.0)
    return A.Compose([
        A.Sequential([
            A.HorizontalFlip(p=p_each),
            A.VerticalFlip(p=p_each),
            Rotate90or270(p=p_each),
            A.OneOf([
                A.Affine(scale={"x": (1.0, 1.1), "y": (1.0, 1.0)}, **geo),
                A.Affine(scale={"x": (1.0, 1.0), "y": (1.0, 1.1)}, **geo),
                A.Affine(scale=(1.0, 1.1), keep_ratio=True, **geo),
            ], p=p_each),
            A.ColorJitter(brightness=0, contrast=0, saturation=0, hue=0.03, p=p_each),
            A.ColorJitter(brightness=0, contrast=0, saturation=0.05, hue=0, p=p_each),
            A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0, p=p_each),
            A.RandomBrightnessContrast(brightness_limit=0, contrast_limit=0.1, p=p_each),
            A.GaussianBlur(blur_limit=0, sigma_limit=(_MIN_SIGMA, 0.5), p=p_each),
        ], p=p_eligible),
    ])


class PaperAugment:
    """The dataset-side callable ``(image, mask) -> (image, mask)`` around :func:`paper_augmentation`."""

    def __init__(self, p_eligible: float = 0.75, p_each: float = 0.3, seed: int | None = None) -> None:
        self.pipeline = paper_augmentation(p_eligible, p_each)
        if seed is not None:
            _seed_each(self.pipeline, seed)

    def __call__(self, image: npt.NDArray[np.uint8],
                 mask: npt.NDArray[np.uint8]) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
        """The augmented patch (HWC) and its mask, moved together."""
        out = self.pipeline(image=image, mask=mask)
        return out["image"], out["mask"]


def _seed_each(transform: Any, seed: int) -> None:
    """Seed every transform of a pipeline with its own seed.

    ``Compose.set_random_seed`` gives each child the *same* seed, so with it two ``p=0.3`` flips fire together
    (measured: 30 % of samples flipped instead of 51 %); distinct seeds keep the transforms independent.
    """
    counter = iter(range(1_000_000))

    def walk(t: Any) -> None:
        t.set_random_seed(seed * 1009 + next(counter))
        if isinstance(t, A.BaseCompose):
            for child in t.transforms:
                walk(child)

    walk(transform)
