from __future__ import annotations

import numpy as np
import pytest
import tiffslide
from conftest import tissue_image, write_pyramid
from PIL import Image

from al_core import SlideError, open_slide


def test_aperio_svs_metadata(sample_svs):
    with open_slide(sample_svs) as s:
        assert s.dimensions == (2220, 2967)
        assert s.level_count == 1
        assert s.mpp == pytest.approx(0.499)
        assert s.objective_power == 20
        assert s.vendor == "aperio"


def test_pyramid_levels_and_best_level(sample_pyramid):
    with open_slide(sample_pyramid) as s:
        assert s.level_count == 4
        assert s.mpp == pytest.approx(0.499, rel=1e-3)
        # level 1 has downsample 2.0003: it must still serve a request for 2x, not level 0
        assert s.best_level(2.0) == 1
        assert s.best_level(3.9) == 1
        assert s.best_level(4.0) == 2
        assert s.best_level(100) == 3
        assert s.best_level(0.5) == 0


def test_read_matches_raw_read_region_and_resize(sample_pyramid):
    import cv2

    with open_slide(sample_pyramid) as s:
        ours = s.read((512, 768), (256, 256), downsample=4.0)
        three = s.read((512, 768), (200, 200), downsample=3.0)
    raw = tiffslide.TiffSlide(sample_pyramid)
    # level 2 (downsample 4.002) serves 4x: round(256 * 4 / 4.002) = 256 px, no resize
    region = raw.read_region((512, 768), 2, (256, 256), as_array=True)
    assert ours.shape == (256, 256, 3)
    assert np.abs(ours.astype(int) - region[..., :3].astype(int)).mean() < 1.0
    # 3x comes from level 1 (2.0003) and is resized once
    l1 = raw.read_region((512, 768), 1, (300, 300), as_array=True)
    want = cv2.resize(np.ascontiguousarray(l1[..., :3]), (200, 200), interpolation=cv2.INTER_AREA)
    assert np.abs(three.astype(int) - want.astype(int)).mean() < 1.0


def test_read_target_mpp_equals_downsample(sample_svs):
    with open_slide(sample_svs) as s:
        a = s.read((1000, 1200), (128, 128), target_mpp=0.998)
        b = s.read((1000, 1200), (128, 128), downsample=2.0)
    assert np.array_equal(a, b)
    assert a.std() > 5  # real tissue, not blank


def test_read_outside_slide_is_white(sample_svs):
    with open_slide(sample_svs) as s:
        img = s.read((2200, 2950), (64, 64), downsample=1.0)
    assert img.shape == (64, 64, 3)
    assert (img[40:, 40:] == 255).all()


def test_thumbnail(sample_pyramid):
    with open_slide(sample_pyramid) as s:
        thumb, ds = s.thumbnail(512)
    assert max(thumb.shape[:2]) <= 512
    assert ds == pytest.approx(2967 / 512)


def test_generated_pyramid_with_subifds(generated_pyramid):
    with open_slide(generated_pyramid) as s:
        assert s.level_count == 3
        assert s.level_dimensions[2] == (512, 384)
        assert s.mpp == pytest.approx(0.25)


def test_ome_tiff(tmp_path):
    path = write_pyramid(tmp_path / "x.ome.tif", tissue_image(600, 500), mpp=0.5, levels=2, ome=True)
    with open_slide(path) as s:
        assert s.dimensions == (600, 500)
        assert s.mpp == pytest.approx(0.5)
        assert s.level_count == 2


def test_png_is_one_level_and_needs_mpp(tmp_path):
    p = tmp_path / "tile.png"
    Image.fromarray(tissue_image(300, 200)).save(p)
    with open_slide(p) as s:
        assert s.dimensions == (300, 200)
        assert s.mpp is None
        with pytest.raises(SlideError, match="tile.png: has no microns-per-pixel"):
            s.require_mpp()
    with open_slide(p, mpp=0.5) as s:
        assert s.downsample_for_mpp(1.0) == 2.0


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("missing.svs", None, "missing.svs: file not found"),
        ("bad.svs", b"this is not a tiff file at all" * 10, "bad.svs: not a readable TIFF slide"),
        ("slide.mrxs", b"x", "slide.mrxs: unsupported file type .mrxs"),
        ("broken.png", b"\x89PNG\r\n\x1a\n garbage", "broken.png: not a readable image"),
    ],
)
def test_bad_files_name_the_file(tmp_path, name, content, match):
    p = tmp_path / name
    if content is not None:
        p.write_bytes(content)
    with pytest.raises(SlideError, match=match):
        open_slide(p)


def test_truncated_file_is_detected(tmp_path, sample_pyramid):
    data = sample_pyramid.read_bytes()
    p = tmp_path / "cut.tif"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(SlideError, match="cut.tif: .*truncated|cut.tif: not a readable"):
        open_slide(p)


def test_bad_mpp_rejected(sample_svs):
    with pytest.raises(SlideError, match="mpp must be a positive number"):
        open_slide(sample_svs, mpp=-1)
