"""Pre-annotation (al_core.wsi.preannotate): a hematoxylin threshold on generated images and the real sample."""

from __future__ import annotations

import numpy as np
import pytest
import shapely
from conftest import write_pyramid
from PIL import Image

from al_core.project.labels_io import read_geojson
from al_core.wsi.preannotate import PREANNOTATION_MPP, hematoxylin_mask, preannotate
from al_core.wsi.raster import rasterize
from al_core.wsi.slides import open_slide
from al_core.wsi.tissue import compute_tissue

EOSIN = (230, 150, 190)  # pink stroma
HEMATOXYLIN = (90, 50, 150)  # purple, cell-dense


def he_image(w: int = 240, h: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Pink 'stroma' with one purple 'epithelium' block (and texture); returns the image and the block's mask."""
    rng = np.random.default_rng(seed)
    img = np.empty((h, w, 3), np.int16)
    img[:] = EOSIN
    truth = np.zeros((h, w), bool)
    truth[h // 4 : h * 13 // 20, w // 4 : w * 2 // 3] = True  # 240x200: rows 50..130, cols 60..160
    img[truth] = HEMATOXYLIN
    img += rng.integers(-12, 12, size=(h, w, 1), dtype=np.int16)
    return np.clip(img, 0, 255).astype(np.uint8), truth


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def test_hematoxylin_mask_finds_the_purple_region():
    img, truth = he_image()
    mask = hematoxylin_mask(img)
    assert mask.dtype == bool and mask.shape == truth.shape
    assert _iou(mask, truth) > 0.9
    assert not mask[:, :40].any()  # plain eosin: nothing


def test_hematoxylin_mask_stays_inside_the_tissue():
    img, truth = he_image()
    tissue = np.zeros(truth.shape, bool)
    tissue[:, :110] = True  # the purple block's right half lies on "glass"
    mask = hematoxylin_mask(img, tissue)
    assert not (mask & ~tissue).any()
    assert _iou(mask, truth & tissue) > 0.85


def test_preannotate_on_a_generated_slide(tmp_path):
    """Polygons in level-0 px of the requested class, read at 4 µm/px (a 0.5 µm/px slide: 8x down)."""
    img, truth = he_image(960, 800)
    slide_path = write_pyramid(tmp_path / "he.tif", img, mpp=0.5, levels=2)
    with open_slide(slide_path) as s:
        shapes = preannotate(s, class_idx=3)
    assert [c for c, _ in shapes] == [3]
    geom = shapes[0][1]
    assert geom.is_valid
    x0, y0, x1, y1 = geom.bounds  # the block is x 240..640, y 200..520 at level 0
    assert abs(x0 - 240) < 24 and abs(x1 - 640) < 24 and abs(y0 - 200) < 24 and abs(y1 - 520) < 24
    back = rasterize(shapes, (0, 0), 1.0, (960, 800)) == 3
    assert _iou(back, truth) > 0.85


def test_preannotate_without_mpp_reads_8x_down(tmp_path):
    img, truth = he_image(960, 800)
    png = tmp_path / "he.png"
    Image.fromarray(img).save(png)
    with open_slide(png) as s:
        assert s.mpp is None
        shapes = preannotate(s, 1)
    back = rasterize(shapes, (0, 0), 1.0, (960, 800)) == 1
    assert _iou(back, truth) > 0.8


def test_preannotate_real_sample_matches_the_bundled_preannotation(sample_svs, sample_geojson):
    """The bundled pre-annotation was drawn the same way: the two agree, and the result lies on tissue."""
    with open_slide(sample_svs) as s:
        tissue = compute_tissue(s)
        shapes = preannotate(s, 1, tissue.mask, tissue.downsample)
        assert s.downsample_for_mpp(PREANNOTATION_MPP) == pytest.approx(4.0 / 0.499)
    assert [c for c, _ in shapes] == [1] and all(g.is_valid for _, g in shapes)
    mine = shapely.union_all([g for _, g in shapes])
    assert 0.05 < mine.area / (2220 * 2967) < 0.4
    ref = shapely.union_all([f.geometry for f in read_geojson(sample_geojson).shapes])
    assert mine.intersection(ref).area / mine.union(ref).area > 0.6
    h, w = tissue.mask.shape
    drawn = rasterize(shapes, (0, 0), tissue.downsample, (w, h)) > 0
    assert (drawn & ~tissue.mask).sum() < 0.03 * drawn.sum()


def test_project_preannotate_is_a_new_label_version(tmp_path, sample_svs):
    from al_core import Project

    with Project.create(tmp_path / "p", ["Epithelium:#c80000", "Stroma:#00a000"]) as proj:
        slide = proj.add_slide(sample_svs)
        version, share = proj.preannotate(slide.name, 2)
        assert version == 1 and proj.label_version(slide.id) == 1
        anns = proj.annotations(slide.id)
        assert {a.class_idx for a in anns} == {2}
        assert share == pytest.approx(sum(a.geometry.area for a in anns) / (2220 * 2967))
        assert 0.05 < share < 0.4
        [info] = proj.labels.history(slide.id)
        assert info.author == "preannotate" and "uncorrected" in info.message
