"""Stain preprocessing (al_core.wsi.stain): Macenko stain separation into EHO channels, the RGB pass-through."""

from __future__ import annotations

import numpy as np
import pytest

from al_core.wsi.slides import open_slide
from al_core.wsi.stain import MacenkoEHO, get_preprocessor
from al_core.wsi.tissue import compute_tissue


def test_macenko_eho_preprocessing(sample_svs):
    with open_slide(sample_svs) as s:
        tissue = compute_tissue(s)
        rgb = s.read((0, 0), (555, 742), downsample=4.0)
    import cv2

    bg = cv2.resize(tissue.mask.astype(np.uint8), (555, 742), interpolation=cv2.INTER_NEAREST) == 0
    pre = get_preprocessor("macenko_eho")
    with pytest.raises(ValueError, match="before fit"):
        pre(rgb[None])
    pre.fit(rgb, bg)
    eho = pre(rgb[None])[0]
    assert eho.dtype == np.float32 and eho.min() >= 0 and eho.max() <= 255
    # stain and density are high on tissue and near zero on glass
    assert (eho[~bg].mean(0) > 3 * eho[bg].mean(0) + 10).all()
    with pytest.raises(ValueError, match="too little tissue"):
        MacenkoEHO().fit(np.full((64, 64, 3), 245, np.uint8))
    with pytest.raises(ValueError, match="unknown preprocessing step 'nope'"):
        get_preprocessor("nope")


def test_rgb_preprocessing_is_a_float_pass_through():
    batch = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    for name in ("none", "rgb"):
        pre = get_preprocessor(name)
        pre.fit(batch[0])  # nothing to learn
        out = pre(batch)
        assert out.dtype == np.float32 and np.array_equal(out, batch.astype(np.float32))
