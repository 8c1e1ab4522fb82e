"""Reading a row's run of patches as one region gives the patches a per-patch read gives."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from al_core.deploy.read_runs import read_patches, row_runs
from al_core.wsi.grid import GridSpec, grid_boxes
from al_core.wsi.slides import open_slide


def test_runs_split_at_rows_gaps_and_the_cap() -> None:
    xs = np.array([0, 224, 448, 1000, 1224, 0, 224, 448, 672], np.int64)
    ys = np.array([0, 0, 0, 0, 0, 224, 224, 224, 224], np.int64)
    assert row_runs(xs, ys, 256) == [(0, 3), (3, 5), (5, 9)]  # a tissue gap at x 448→1000, a new row at 5
    assert row_runs(xs, ys, 256, max_run=2) == [(0, 2), (2, 3), (3, 5), (5, 7), (7, 9)]
    assert row_runs(xs[:0], ys[:0], 256) == []


@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 30)), min_size=1, max_size=60, unique=True),
       st.integers(1, 8))
def test_runs_cover_every_patch_once_in_order(cells: list[tuple[int, int]], cap: int) -> None:
    cells.sort()  # row-major, as the grid gives them
    ys = np.array([r * 224 for r, _ in cells], np.int64)
    xs = np.array([c * 224 for _, c in cells], np.int64)
    runs = row_runs(xs, ys, 256, max_run=cap)
    assert [i for a, b in runs for i in range(a, b)] == list(range(len(cells)))
    for a, b in runs:
        assert 1 <= b - a <= cap and len(set(ys[a:b])) == 1
        assert all(0 < d <= 256 for d in np.diff(xs[a:b]))


def _per_patch(slide, xs, ys, ds, patch):
    return np.stack([slide.read((round(x * ds), round(y * ds)), (patch, patch), downsample=ds)
                     for x, y in zip(xs, ys, strict=True)])


@pytest.mark.parametrize("ds", [1.0, 2.0, 4.0])
def test_runs_read_what_single_patches_read(generated_pyramid: Path, ds: float) -> None:
    """At the pyramid's own levels (and level 0) a run's patches are the per-patch reads, pixel for pixel."""
    with open_slide(generated_pyramid) as slide:
        w, h = slide.dimensions
        boxes = grid_boxes(round(w / ds), round(h / ds), GridSpec(patch=128, overlap=32, downsample=1.0), 1.0)
        keep = np.arange(len(boxes))[::3] if ds == 1.0 else np.arange(len(boxes))  # gaps in the rows too
        xs, ys = boxes.x[keep], boxes.y[keep]
        got = [(part, rgb) for part, rgb in read_patches(slide, xs, ys, ds, 128, batch_size=5)]
        assert [p.start for p, _ in got] == list(range(0, len(xs), 5))
        rgb = np.concatenate([r for _, r in got])
        assert rgb.shape == (len(xs), 128, 128, 3)
        np.testing.assert_array_equal(rgb, _per_patch(slide, xs, ys, ds, 128))


def test_an_off_level_scale_reads_each_patch_as_training_did(sample_svs: Path) -> None:
    """Between levels (0.499 µm/px read at 2 µm/px: ×4.008) a run's resampling grid would not land where each
    patch's did (its corner is rounded to a level-0 pixel): the deployed model must see the training pixels,
    so each patch is read on its own, exactly as before."""
    with open_slide(sample_svs) as slide:
        ds = 2.0 / slide.mpp
        w, h = slide.dimensions
        boxes = grid_boxes(round(w / ds), round(h / ds), GridSpec(patch=128, overlap=16, downsample=1.0), 1.0)
        rgb = np.concatenate([r for _, r in read_patches(slide, boxes.x, boxes.y, ds, 128, batch_size=4)])
        ref = _per_patch(slide, boxes.x, boxes.y, ds, 128)
    np.testing.assert_array_equal(rgb, ref)
