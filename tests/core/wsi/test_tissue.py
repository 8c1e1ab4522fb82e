"""Tissue detection (al_core.wsi.tissue) on the real sample and on generated images."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import tissue_image

from al_core import open_slide
from al_core.wsi.tissue import compute_tissue, tissue_mask_from_rgb


def test_tissue_on_real_sample(sample_svs):
    with open_slide(sample_svs) as s:
        t = compute_tissue(s)
    assert t.downsample == pytest.approx(8.0 / 0.499)
    # the sample is a strip of skin on glass: about a third is tissue
    assert 0.2 < t.fraction < 0.5
    h, w = t.mask.shape
    # glass at the left edge, tissue in the middle of the strip
    assert not t.mask[:, : w // 10].any()
    assert t.mask[h // 2 - 5 : h // 2 + 5, w // 3 : w // 2].mean() > 0.5


def test_tissue_generated_ellipse_and_blank():
    img = tissue_image(400, 300)
    mask = tissue_mask_from_rgb(img, pixel_um=8.0)
    truth = (img != 242).any(axis=2)
    iou = (mask & truth).sum() / (mask | truth).sum()
    assert iou > 0.9
    assert not tissue_mask_from_rgb(np.full((100, 100, 3), 245, np.uint8)).any()
    with pytest.raises(ValueError, match="expected an RGB image"):
        tissue_mask_from_rgb(np.zeros((10, 10), np.uint8))
