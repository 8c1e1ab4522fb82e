"""Class maps to GeoJSON (al_core.deploy.vectorise): speckle and small holes go, the rest is kept exactly."""

from __future__ import annotations

import json

import hypothesis.extra.numpy as hnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from shapely.geometry import shape
from skimage.morphology import remove_small_holes, remove_small_objects

from al_core.deploy.config import ClassSpec, InferenceConfig
from al_core.deploy.vectorise import _without_small, write_geojson


@settings(max_examples=80, deadline=None)
@given(hnp.arrays(np.bool_, st.tuples(st.integers(1, 40), st.integers(1, 40))), st.integers(1, 12))
def test_speckle_filter_is_scikit_images(m, limit):
    # the OpenCV pass replaced skimage's remove_small_objects/holes for speed: same regions, same holes
    expect = remove_small_holes(remove_small_objects(m, max_size=limit), max_size=limit)
    assert np.array_equal(~_without_small(~_without_small(m, limit), limit), expect)


def test_geojson_drops_speckle_fills_pinholes_and_keeps_regions(tmp_path):
    cmap = np.zeros((64, 64), np.uint8)
    cmap[8:40, 8:40] = 1
    cmap[20, 20] = 0  # a pinhole: filled
    cmap[50:52, 50:52] = 1  # 4 px of speckle: dropped
    cmap[44:60, 2:18] = 2
    cfg = InferenceConfig(classes=(ClassSpec(0, "Background", "#000000"), ClassSpec(1, "Tumour", "#c80000"),
                                   ClassSpec(2, "Stroma", "#00c800")))
    path = tmp_path / "out.geojson"
    assert write_geojson(path, cmap, 4.0, cfg) == 2
    feats = {f["properties"]["classification"]["name"]: shape(f["geometry"]) for f in json.loads(path.read_text())["features"]}
    assert feats["Tumour"].area == (32 * 4) ** 2 and not feats["Tumour"].interiors
    assert feats["Stroma"].bounds == (8.0, 176.0, 72.0, 240.0)


def test_a_map_of_many_regions_keeps_every_region(tmp_path):
    # over 512 parts: simplified in two threads; every region must come back once, where it was
    cmap = np.zeros((240, 240), np.uint8)
    corners = [(y, x) for y in range(0, 240, 8) for x in range(0, 240, 8)]
    for y, x in corners:
        cmap[y + 1:y + 6, x + 1:x + 6] = 1
    cfg = InferenceConfig(classes=(ClassSpec(0, "Background", "#000000"), ClassSpec(1, "Gland", "#c80000")))
    path = tmp_path / "many.geojson"
    assert write_geojson(path, cmap, 2.0, cfg) == 1
    [feat] = json.loads(path.read_text())["features"]
    geom = shape(feat["geometry"])
    assert len(geom.geoms) == len(corners) == 900
    assert sorted((g.bounds[1], g.bounds[0]) for g in geom.geoms) == [(2.0 * (y + 1), 2.0 * (x + 1)) for y, x in corners]
    assert all(g.area == 100.0 for g in geom.geoms)
