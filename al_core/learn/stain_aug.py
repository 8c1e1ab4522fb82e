"""HED colour augmentation: jitter the haematoxylin, eosin and DAB stain channels of an H&E patch.

Colour deconvolution (Ruifrok & Johnston, scikit-image's ``rgb2hed``) splits a patch into stain
concentrations; each is scaled by ``1 ± scale`` and shifted by ``± shift`` (uniform, per patch), then recombined
(``hed2rgb``). This is the "HED-light" augmentation of Tellez et al. (2018/2019), which best carried nuclei and
tissue models across staining labs, and it sits beside the paper's brightness/contrast/hue set
(:mod:`al_core.learn.augment`). The mask is untouched: the transform moves colour, never geometry.
"""

from __future__ import annotations

from typing import Any

import albumentations as A
import numpy as np
import numpy.typing as npt
from skimage.color import hed_from_rgb, rgb_from_hed

#: scikit-image's optical-density scale (``rgb2hed`` divides ``log(rgb)`` by it)
_LOG_ADJUST = float(np.log(1e-6))


def hed_jitter(image: npt.NDArray[np.uint8], alpha: npt.ArrayLike, beta: npt.ArrayLike) -> npt.NDArray[np.uint8]:
    """``image`` (HWC uint8 RGB) with stain concentrations ``hed · alpha + beta`` (three values each).

    scikit-image's stain matrices and optical-density scale, as in ``rgb2hed``/``hed2rgb``, but without their
    clipping of negative concentrations, so ``alpha = 1, beta = 0`` gives the image back (to rounding).
    """
    rgb = np.maximum(image.astype(np.float64) / 255.0, 1e-6)
    hed = (np.log(rgb) / _LOG_ADJUST) @ hed_from_rgb
    hed = hed * np.asarray(alpha, dtype=np.float64) + np.asarray(beta, dtype=np.float64)
    out: npt.NDArray[np.float64] = np.exp((hed @ rgb_from_hed) * _LOG_ADJUST)
    return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)


class HEDJitter(A.ImageOnlyTransform):  # type: ignore[misc]  # albumentations is untyped
    """Per-stain scale ``U(1 − scale, 1 + scale)`` and shift ``U(−shift, shift)`` in HED space."""

    def __init__(self, scale: float = 0.05, shift: float = 0.01, p: float = 0.5) -> None:
        super().__init__(p=p)
        if not 0.0 <= scale < 1.0 or shift < 0:
            raise ValueError(f"HED jitter needs 0 <= scale < 1 and shift >= 0, got {scale}, {shift}")
        self.scale, self.shift = scale, shift

    def get_params(self) -> dict[str, Any]:
        """One draw of the three scales and three shifts, from the transform's own seeded generator."""
        rng = self.random_generator
        return {"alpha": rng.uniform(1 - self.scale, 1 + self.scale, 3), "beta": rng.uniform(-self.shift,
                                                                                              self.shift, 3)}

    def apply(self, img: npt.NDArray[np.uint8], alpha: npt.NDArray[np.float64] | None = None,
              beta: npt.NDArray[np.float64] | None = None, **params: Any) -> npt.NDArray[np.uint8]:
        """The jittered image (no draw given: unchanged stain amounts)."""
        return hed_jitter(img, np.ones(3) if alpha is None else alpha, np.zeros(3) if beta is None else beta)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        """The arguments albumentations' serialisation records."""
        return ("scale", "shift")
