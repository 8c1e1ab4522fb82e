"""Preprocessing steps a model config can name (``preprocess = "..."``), applied to RGB patches.

A step is fitted once per slide (stain statistics need the whole slide, not one patch, or every patch
would be normalised differently) and then maps uint8 RGB batches ``(N, H, W, 3)`` to float32 batches of the
same shape in the 0–255 range; the config's ``scale``/``mean``/``std`` follow.

``macenko_eho`` makes the "EHO" input of models such as SHELL: Macenko PCA stain vectors (the
``macenko-pca`` package) → eosin and hematoxylin concentrations and the mean optical density, each
stretched between its 1st and 99th slide percentile and clipped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np
import numpy.typing as npt

from al_core.errors import SlideloopError

FloatArray = npt.NDArray[np.float32]
U8Array = npt.NDArray[np.uint8]
BoolArray = npt.NDArray[np.bool_]


class Preprocessor(Protocol):
    """A per-slide preprocessing step."""

    name: str

    def fit(self, rgb: U8Array, background: BoolArray | None = None) -> None:
        """Learn slide statistics from a low-resolution RGB image of the slide (``background`` True = glass)."""

    def __call__(self, batch: U8Array) -> FloatArray:
        """Map an ``(N, H, W, 3)`` uint8 batch to float32 in the 0–255 range."""


class Identity:
    """No preprocessing: RGB as float."""

    name = "none"

    def fit(self, rgb: U8Array, background: BoolArray | None = None) -> None:
        """Nothing to learn from the slide."""
        pass

    def __call__(self, batch: U8Array) -> FloatArray:
        """The batch as float32, values unchanged."""
        return batch.astype(np.float32)


class MacenkoEHO:
    """Eosin, Hematoxylin, optical density channels from Macenko PCA stain separation."""

    name = "macenko_eho"

    def __init__(self, percentiles: tuple[float, float] = (1.0, 99.0)) -> None:
        self.percentiles = percentiles
        self._proj: FloatArray | None = None  # (3, 3): OD -> (E, H, mean OD)
        self._lo: FloatArray | None = None
        self._range: FloatArray | None = None
        self.io = 240.0

    def fit(self, rgb: U8Array, background: BoolArray | None = None) -> None:
        """Learn the slide's stain vectors, illumination and feature percentiles from a low-resolution RGB image
        (``background`` True = glass; default: bright, unsaturated pixels).

        Raises ``StainError`` with too little tissue or when the stain estimation fails."""
        import macenko_pca

        if rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"expected an RGB image, got shape {rgb.shape}")
        if background is None:
            # glass is bright and unsaturated
            background = (rgb.min(axis=2) > 200) & (rgb.max(axis=2).astype(int) - rgb.min(axis=2) < 25)
        # the illumination (background intensity) sets optical density zero; pure-white padding is not glass
        glass = background & ~(rgb == 255).all(axis=2)
        self.io = float(np.clip(rgb[glass].mean(), 200, 255)) if glass.sum() >= 100 else 240.0
        tissue_px = int((~background).sum())
        if tissue_px < 100:
            raise StainError(f"too little tissue ({tissue_px} px) to estimate stain vectors")
        try:
            w = np.asarray(macenko_pca.rgb_separate_stains_macenko_pca(
                rgb.astype(np.float32), bg_int=[self.io], mask_out=np.ascontiguousarray(background)))
        except (ValueError, RuntimeError) as err:
            raise StainError(f"Macenko stain estimation failed: {err}") from err
        h_idx = macenko_pca.find_stain_index(macenko_pca.stain_color_map["hematoxylin"], w)
        e_idx = macenko_pca.find_stain_index(macenko_pca.stain_color_map["eosin"], w)
        if h_idx == e_idx or 2 in (h_idx, e_idx):  # the third column is the cross-product residual
            h_idx, e_idx = 0, 1
        w_inv = np.linalg.pinv(w.astype(np.float64)).astype(np.float32)
        self._proj = np.stack([w_inv[e_idx], w_inv[h_idx], np.full(3, 1 / 3, np.float32)]).astype(np.float32)
        feats = self._features(rgb[None])[0]
        sample = feats[~background] if tissue_px > 0 else feats.reshape(-1, 3)
        lo, hi = np.percentile(sample, self.percentiles, axis=0).astype(np.float32)
        rng = hi - lo
        self._lo = lo
        self._range = np.where(rng > 1e-8, rng, 1.0).astype(np.float32)

    def _features(self, batch: U8Array) -> FloatArray:
        assert self._proj is not None
        od = np.clip(batch.astype(np.float32), 1.0, self.io)
        od /= np.float32(self.io)
        np.log10(od, out=od)
        od *= -1.0
        return od @ self._proj.T

    def __call__(self, batch: U8Array) -> FloatArray:
        """Eosin, hematoxylin and mean optical density of a ``(N, H, W, 3)`` batch, each stretched between the
        slide's percentiles to 0–255.

        Raises ``StainError`` before :meth:`fit`."""
        if self._proj is None or self._lo is None or self._range is None:
            raise StainError("macenko_eho used before fit() on the slide")
        f = self._features(batch)
        f -= self._lo
        f /= self._range
        np.clip(f, 0.0, 1.0, out=f)
        f *= 255.0
        return f


class StainError(SlideloopError, ValueError):
    """Stain separation cannot be done on this image."""


PREPROCESSORS: dict[str, Callable[[], Preprocessor]] = {
    "none": Identity,
    "rgb": Identity,
    "macenko_eho": MacenkoEHO,
}


def register_preprocessor(name: str, factory: Callable[[], Preprocessor]) -> None:
    """Make ``factory`` available to configs as ``preprocess = name``."""
    PREPROCESSORS[name] = factory


def get_preprocessor(name: str) -> Preprocessor:
    """A fresh (unfitted) preprocessing step by name; unknown names list the known ones."""
    try:
        return PREPROCESSORS[name]()
    except KeyError:
        raise ValueError(f"unknown preprocessing step {name!r}; known: {', '.join(sorted(PREPROCESSORS))}") from None
