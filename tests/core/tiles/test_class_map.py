"""Overlay tiles of an inference class map (al_core.tiles.class_map): nearest-sampled classes, colours, errors."""

from __future__ import annotations

import io

import numpy as np
import pytest
import tifffile
from PIL import Image

from al_core.deploy.infer import infer_slide
from al_core.errors import SlideError
from al_core.tiles.cache import LRUCache
from al_core.tiles.class_map import ClassMapTiles
from al_core.tiles.pyramid import Pyramid


@pytest.fixture(scope="module")
def class_map(tmp_path_factory, dark_model, sample_svs):
    out = tmp_path_factory.mktemp("cmap") / "pred.tiff"
    infer_slide(dark_model, sample_svs, out, geojson=False)
    return out


def test_tiles_sample_the_class_map_nearest(class_map):
    tiles = ClassMapTiles(class_map)
    pyr = tiles.pyramid
    assert (pyr.width, pyr.height) == (2220, 2967) and pyr.zmax == Pyramid(2220, 2967).zmax
    assert [c["name"] for c in tiles.classes] == ["Background", "Tissue"]
    level0 = tifffile.imread(class_map)
    top = tiles.read(pyr.zmax, 3, 4)  # one tile pixel per level-0 pixel
    assert np.array_equal(top, level0[1024:1280, 768:1024]) and 0 < top.mean() < 1
    edge = tiles.read(pyr.zmax, 8, 11)  # the slide ends inside this tile: padding is class 0
    w, h = pyr.valid_size(pyr.zmax, 8, 11)
    assert np.array_equal(edge[:h, :w], level0[11 * 256 :, 8 * 256 :]) and not edge[h:, :].any()
    low = tiles.read(1, 0, 0)
    assert set(np.unique(low)) <= {0, 1}  # never an interpolated, invented class


def test_tile_png_and_cache(class_map):
    cache = LRUCache()
    tiles = ClassMapTiles(class_map, cache)
    data = tiles.tile(2, 1, 1)
    rgba = np.asarray(Image.open(io.BytesIO(data)))
    classes = tiles.read(2, 1, 1)
    assert rgba.shape == (256, 256, 4) and ((rgba[..., 3] > 0) == (classes > 0)).all()
    assert tiles.tile(2, 1, 1) == data and cache.hits == 1


def test_not_a_class_map(tmp_path):
    bad = tmp_path / "x.tiff"
    bad.write_bytes(b"not a tiff at all" * 20)
    with pytest.raises(SlideError, match="cannot be opened as a class-map TIFF"):
        ClassMapTiles(bad)
