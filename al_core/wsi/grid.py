"""The patch grid: which level-0 regions become training/prediction patches. Pure geometry, no I/O.

NoCodeSeg's default: 2048² regions at 40x (0.25 µm/px) read 4x down to 512² patches with 128 px overlap,
patches with < 25 % tissue dropped. Here it is expressed physically (µm per output pixel), so a 20x slide
gets the same tissue scale: ``target_mpp = 1.0`` reads 1024² level-0 regions of a 0.5 µm/px slide.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from al_core.errors import GridError

#: µm per output pixel of the NoCodeSeg grid (0.25 µm/px at 40x, read 4x down)
DEFAULT_TARGET_MPP = 1.0
#: the most a grid may enlarge level 0: more invents pixels the scanner never saw (and multiplies the cache)
MIN_DOWNSAMPLE = 0.25
#: the largest patch side in output pixels (a 4096² RGB patch is 50 MB in the cache)
MAX_PATCH = 4096
#: the most patches one slide's grid may have before the tissue filter (a 40x slide at the default grid: ~10k)
MAX_SLIDE_PATCHES = 1_000_000


@dataclass(frozen=True)
class GridSpec:
    """How to cut patches. Give ``target_mpp`` (physical) or ``downsample`` (from level 0); if neither,
    slides with mpp use :data:`DEFAULT_TARGET_MPP` and others a downsample of 4.

    ``patch`` and ``overlap`` are in output pixels (``overlap`` defaults to a quarter of the patch, NoCodeSeg's
    128 px of 512); ``min_tissue`` is the tissue fraction (0–1) a patch needs to be kept.
    """

    patch: int = 512
    overlap: int = None  # type: ignore[assignment]  # resolved to patch // 4 in __post_init__
    min_tissue: float = 0.25
    target_mpp: float | None = None
    downsample: float | None = None

    def __post_init__(self) -> None:
        if self.overlap is None:
            object.__setattr__(self, "overlap", self.patch // 4)
        if not 16 <= self.patch <= MAX_PATCH:
            raise GridError(f"patch size must be at least 16 px and at most {MAX_PATCH} px, got {self.patch}")
        if not 0 <= self.overlap < self.patch:
            raise ValueError(f"overlap must be in [0, patch), got {self.overlap} for patch {self.patch}")
        if not 0.0 <= self.min_tissue <= 1.0:
            raise ValueError(f"min_tissue is a fraction in [0, 1], got {self.min_tissue}")
        if self.target_mpp is not None and self.downsample is not None:
            raise ValueError("give target_mpp or downsample, not both")
        for name in ("target_mpp", "downsample"):
            v = getattr(self, name)
            if v is not None and not (v > 0 and math.isfinite(v)):
                raise ValueError(f"{name} must be a positive number, got {v}")
        if self.downsample is not None and self.downsample < MIN_DOWNSAMPLE:
            raise GridError(_enlarge_message(self.downsample))

    @property
    def stride(self) -> int:
        """The step between neighbouring patches in output pixels (``patch - overlap``)."""
        return self.patch - self.overlap

    def downsample_for(self, slide_mpp: float | None) -> float:
        """Level-0 downsample of this grid on a slide with ``slide_mpp`` µm/px (``None`` if unknown)."""
        if self.downsample is not None:
            return self.downsample
        target = self.target_mpp if self.target_mpp is not None else DEFAULT_TARGET_MPP
        if slide_mpp is None:
            if self.target_mpp is not None:
                raise ValueError("the grid is in µm (target_mpp) but the slide has no microns-per-pixel metadata; give its scale")
            return 4.0
        down = target / slide_mpp
        if down < MIN_DOWNSAMPLE:
            raise GridError(f"{target} µm/px on a {slide_mpp} µm/px slide: " + _enlarge_message(down))
        return down

    def to_dict(self) -> dict[str, Any]:
        """The spec as a plain dict (as stored with the grid)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GridSpec:
        """Rebuild from :meth:`to_dict` output; other keys are ignored."""
        return cls(**{k: d[k] for k in ("patch", "overlap", "min_tissue", "target_mpp", "downsample") if k in d})


def _enlarge_message(downsample: float) -> str:
    return (f"a downsample of {downsample:g} enlarges level 0 {1 / downsample:g} times; the limit is "
            f"{MIN_DOWNSAMPLE:g} ({1 / MIN_DOWNSAMPLE:g} times)")


def axis_count(length: float, size: float, stride: float) -> int:
    """How many windows :func:`axis_starts` gives (without making them)."""
    return 1 if length <= size else math.ceil((length - size) / stride) + 1


def axis_starts(length: float, size: float, stride: float) -> list[float]:
    """Start offsets of windows of ``size`` every ``stride`` covering ``[0, length)``.

    ``n = ceil((length - size) / stride) + 1`` windows; the last one is moved back to end at ``length`` so
    no window leaves the image (it then overlaps its neighbour more). A length shorter than ``size`` gives
    one window at 0 (read with white padding).
    """
    if length <= size:
        return [0.0]
    n = math.ceil((length - size) / stride) + 1
    starts = [i * stride for i in range(n)]
    starts[-1] = length - size
    return starts


@dataclass(frozen=True)
class PatchBoxes:
    """Patch rectangles in level-0 pixels: ``x, y`` (top-left), one level-0 ``size`` for all, grid
    ``col, row`` indices, and the output size and downsample they are read at."""

    x: npt.NDArray[np.int64]
    y: npt.NDArray[np.int64]
    col: npt.NDArray[np.int64]
    row: npt.NDArray[np.int64]
    size: int
    patch: int
    downsample: float

    def __len__(self) -> int:
        return int(self.x.size)


def grid_boxes(width: int, height: int, spec: GridSpec, downsample: float) -> PatchBoxes:
    """All patch rectangles of a ``width`` × ``height`` slide (before the tissue filter)."""
    size0 = spec.patch * downsample
    stride0 = spec.stride * downsample
    n = axis_count(width, size0, stride0) * axis_count(height, size0, stride0)
    if n > MAX_SLIDE_PATCHES:
        raise GridError(f"the grid would cut a {width}x{height} px slide into {n:,} patches "
                         f"({spec.patch} px at downsample {downsample:g}); the limit is {MAX_SLIDE_PATCHES:,}")
    xs = axis_starts(width, size0, stride0)
    ys = axis_starts(height, size0, stride0)
    cols, rows = np.meshgrid(np.arange(len(xs)), np.arange(len(ys)))
    x = np.round(np.asarray(xs))[cols.ravel()].astype(np.int64)
    y = np.round(np.asarray(ys))[rows.ravel()].astype(np.int64)
    return PatchBoxes(x, y, cols.ravel().astype(np.int64), rows.ravel().astype(np.int64), round(size0),
                      spec.patch, downsample)


def tissue_fractions(boxes: PatchBoxes, mask: npt.NDArray[np.bool_], mask_downsample: float) -> npt.NDArray[np.float64]:
    """Fraction of tissue pixels of ``mask`` (at ``mask_downsample``) under each box, via an integral image."""
    if len(boxes) == 0:
        return np.zeros(0)
    integral = np.pad(mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    h, w = mask.shape
    x0 = np.clip(np.floor(boxes.x / mask_downsample).astype(np.int64), 0, w)
    y0 = np.clip(np.floor(boxes.y / mask_downsample).astype(np.int64), 0, h)
    x1 = np.clip(np.ceil((boxes.x + boxes.size) / mask_downsample).astype(np.int64), 0, w)
    y1 = np.clip(np.ceil((boxes.y + boxes.size) / mask_downsample).astype(np.int64), 0, h)
    tissue = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    # the full (unclipped) box area: parts outside the slide count as background
    area = np.maximum(1.0, (boxes.size / mask_downsample) ** 2)
    return np.asarray(np.clip(tissue / area, 0.0, 1.0), dtype=np.float64)
