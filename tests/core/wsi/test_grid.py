"""The patch grid (al_core.wsi.grid): window starts, the NoCodeSeg default in physical units, validation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from al_core import GridSpec
from al_core.wsi.grid import PatchBoxes, axis_starts, grid_boxes, tissue_fractions


@pytest.mark.parametrize(
    ("length", "size", "stride", "expected"),
    [
        (100, 100, 50, [0.0]),
        (50, 100, 50, [0.0]),
        (200, 100, 100, [0.0, 100.0]),
        (250, 100, 100, [0.0, 100.0, 150.0]),
        (1000, 512, 384, [0.0, 384.0, 488.0]),
    ],
)
def test_axis_starts(length, size, stride, expected):
    assert axis_starts(length, size, stride) == expected


def test_nocodeseg_default_is_physical():
    spec = GridSpec()
    assert (spec.patch, spec.overlap, spec.min_tissue) == (512, 128, 0.25)
    # 40x: 2048 level-0 px read 4x down to 512; 20x: 1024 read 2x down — the same tissue area
    assert spec.downsample_for(0.25) == pytest.approx(4.0)
    assert spec.downsample_for(0.5) == pytest.approx(2.0)
    assert spec.downsample_for(None) == 4.0
    boxes = grid_boxes(10000, 6000, spec, 4.0)
    assert boxes.size == 2048
    n_cols = math.ceil((10000 - 2048) / (384 * 4)) + 1
    n_rows = math.ceil((6000 - 2048) / (384 * 4)) + 1
    assert len(boxes) == n_cols * n_rows
    assert boxes.x.max() + boxes.size == 10000 and boxes.y.max() + boxes.size == 6000


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"patch": 8}, "at least 16"),
        ({"overlap": 512}, "overlap must be"),
        ({"min_tissue": 1.5}, "fraction"),
        ({"target_mpp": 1.0, "downsample": 4.0}, "not both"),
        ({"downsample": -2.0}, "positive"),
    ],
)
def test_gridspec_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GridSpec(**kwargs)


def test_overlap_defaults_to_a_quarter_of_the_patch():
    # NoCodeSeg's 128 px of 512; a smaller patch gets a proportional overlap instead of an invalid one
    assert GridSpec(patch=128).overlap == 32 and GridSpec(patch=128).stride == 96
    assert GridSpec(patch=16).overlap == 4
    assert GridSpec(patch=256, overlap=0).overlap == 0  # an explicit overlap (even 0) is kept
    assert GridSpec(patch=256, overlap=200).overlap == 200
    spec = GridSpec(patch=200, target_mpp=2.0)
    assert GridSpec.from_dict(spec.to_dict()) == spec and spec.to_dict()["overlap"] == 50
    # a grid stored before the default changed keeps its overlap
    assert GridSpec.from_dict({"patch": 512, "overlap": 128, "min_tissue": 0.25}).overlap == 128


def test_target_mpp_needs_slide_mpp():
    with pytest.raises(ValueError, match="no microns-per-pixel metadata"):
        GridSpec(target_mpp=1.0).downsample_for(None)


def test_tissue_fractions_match_brute_force():
    rng = np.random.default_rng(1)
    mask = rng.random((60, 80)) > 0.6
    boxes = PatchBoxes(
        x=np.array([0, 160, 480, 600]), y=np.array([0, 80, 400, 900]), col=np.zeros(4, np.int64),
        row=np.zeros(4, np.int64), size=160, patch=40, downsample=4.0,
    )
    got = tissue_fractions(boxes, mask, 8.0)
    for i in range(4):
        x0, y0 = boxes.x[i] // 8, boxes.y[i] // 8
        want = mask[y0 : y0 + 20, x0 : x0 + 20].sum() / 400.0
        assert got[i] == pytest.approx(want)
