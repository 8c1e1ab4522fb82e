"""The scale a model is trained at, resolved from the project's grid, so that every later step reads slides at it.

A grid in µm (``target_mpp``) gives that µm/px. A grid at a plain downsample gives the µm/px of its slides when
they all have one and agree, and otherwise, on slides without µm/px metadata, the downsample with an explicit
*uncalibrated* flag: such a model can only be run at the same downsample, and says so everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from al_core.errors import ScaleError
from al_core.project.schema import SlideRow
from al_core.wsi.grid import DEFAULT_TARGET_MPP, GridSpec

#: two effective scales closer than this (relative) are the same scale (rounding of scanner metadata)
SCALE_TOLERANCE = 0.02


@dataclass(frozen=True)
class ModelScale:
    """µm per model pixel (``mpp``), or for uncalibrated slides the level-0 ``downsample`` and ``calibrated=False``."""

    mpp: float | None
    downsample: float | None
    calibrated: bool

    def __post_init__(self) -> None:
        if self.calibrated and self.mpp is None:
            raise ValueError("a calibrated scale needs its µm/px")
        if not self.calibrated and self.downsample is None:
            raise ValueError("an uncalibrated scale needs its downsample")

    def describe(self) -> str:
        """``1 µm/px`` or ``downsample 4 (uncalibrated)``."""
        return f"{self.mpp:g} µm/px" if self.calibrated else f"downsample {self.downsample:g} (uncalibrated)"

    def to_dict(self) -> dict[str, Any]:
        """Plain data (as stored with a model and written in reports)."""
        return asdict(self)

    def same_as(self, other: ModelScale) -> bool:
        """Whether two scales read slides alike (µm/px, or for uncalibrated ones the downsample)."""
        if self.calibrated != other.calibrated:
            return False
        if self.calibrated:
            return self.mpp is not None and other.mpp is not None and same_scale(self.mpp, other.mpp)
        return self.downsample is not None and other.downsample is not None and same_scale(self.downsample,
                                                                                              other.downsample)


def same_scale(a: float, b: float) -> bool:
    """Whether two µm/px (or downsamples) are one scale within :data:`SCALE_TOLERANCE`."""
    return math.isclose(a, b, rel_tol=SCALE_TOLERANCE)


def resolve_grid(spec: GridSpec) -> GridSpec:
    """A spec with neither scale made explicit: NoCodeSeg's µm default (slides without µm/px then need one)."""
    if spec.target_mpp is None and spec.downsample is None:
        return GridSpec(patch=spec.patch, overlap=spec.overlap, min_tissue=spec.min_tissue,
                        target_mpp=DEFAULT_TARGET_MPP)
    return spec


def training_scale(spec: GridSpec, slides: Sequence[SlideRow], downsamples: Mapping[int, float]) -> ModelScale:
    """The scale of a grid's patches: ``downsamples`` maps each slide id with patches to its patch downsample.

    Raises :class:`ScaleError` when the slides are read at different physical scales, or some at a known and
    others at an unknown one: a model trained on them has no single scale to be run at.
    """
    if spec.target_mpp is not None:
        return ModelScale(spec.target_mpp, None, True)
    used = [s for s in slides if s.id in downsamples]
    if not used:
        raise ScaleError("grid", "has no patches: no scale to train at")
    known = {s.name: s.mpp * downsamples[s.id] for s in used if s.mpp is not None}
    unknown = [s.name for s in used if s.mpp is None]
    if known and unknown:
        raise ScaleError(unknown[0], f"has no µm/px metadata while {next(iter(known))} has; a model trained on "
                                     "both would have no single scale. Give the slide its µm/px")
    if unknown:
        ds = {downsamples[s.id] for s in used}
        if len(ds) > 1:
            raise ScaleError("grid", f"reads uncalibrated slides at several downsamples {sorted(ds)}")
        return ModelScale(None, ds.pop(), False)
    first_name, first = next(iter(known.items()))
    for name, mpp in known.items():
        if not same_scale(mpp, first):
            raise ScaleError(name, f"is read at {mpp:.3g} µm/px by the grid but {first_name} at {first:.3g}; "
                                   "cut the grid at one µm/px so the model has one scale")
    return ModelScale(round(first, 6), downsamples[used[0].id], True)


def config_scale(target_mpp: float | None, downsample: float | None, uncalibrated: bool) -> ModelScale | None:
    """The scale recorded in a model config, or ``None`` for a model trained before scales were recorded."""
    if target_mpp is not None:
        return ModelScale(target_mpp, downsample, True)
    if uncalibrated and downsample is not None:
        return ModelScale(None, downsample, False)
    return None


def check_grid_scale(model: str, scale: ModelScale | None, slides: Sequence[SlideRow],
                     downsamples: Mapping[int, float]) -> None:
    """Raise :class:`ScaleError` unless the grid reads every slide at the model's scale (``None``: unknown
    scale, nothing to check); predictions at another scale than the training one mean nothing."""
    if scale is None:
        return
    for s in slides:
        if s.id not in downsamples:
            continue
        ds = downsamples[s.id]
        if scale.calibrated and scale.mpp is not None:
            if s.mpp is None:
                raise ScaleError(s.name, f"has no µm/px metadata, and {model} needs {scale.describe()}")
            if not same_scale(s.mpp * ds, scale.mpp):
                raise ScaleError(s.name, f"is read at {s.mpp * ds:.3g} µm/px by the current grid, but {model} was "
                                         f"trained at {scale.describe()}; cut the grid at that scale or train a "
                                         "model on this grid")
        elif scale.downsample is not None and not same_scale(ds, scale.downsample):
            raise ScaleError(s.name, f"is read at downsample {ds:g} by the current grid, but {model} was trained "
                                     f"at {scale.describe()}")
