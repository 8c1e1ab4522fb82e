"""Tile pyramid arithmetic and tile rendering on the bundled real sample (al_core.tiles)."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from al_core.errors import ProjectError, SlideError
from al_core.grid import GridSpec
from al_core.project import ClassInfo, Project
from al_core.slides import open_slide
from al_core.tiles import (
    PAD_RGB,
    PREDICTION_FILL_ALPHA,
    LRUCache,
    Pyramid,
    TileRangeError,
    TileSource,
    class_palette,
    empty_png,
    paste_patch_classes,
    render_class_tile,
    render_label_tile,
    render_slide_tile,
)


def _rgb(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def _rgba(data: bytes) -> np.ndarray:
    im = Image.open(io.BytesIO(data))
    assert im.mode == "RGBA"
    return np.asarray(im)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, sample_svs: Path, sample_geojson: Path) -> Project:
    folder = tmp_path_factory.mktemp("tiles") / "proj"
    proj = Project.create(folder)
    proj.add_slide(sample_svs)
    proj.build_grid(GridSpec(patch=256))
    proj.import_labels(sample_geojson)
    return proj


class TestPyramid:
    @pytest.mark.parametrize(("size", "zmax"), [((256, 256), 0), ((100, 30), 0), ((257, 10), 1), ((512, 512), 1),
                                                 ((2220, 2967), 4), ((100_000, 80_000), 9)])
    def test_zmax_is_full_resolution(self, size: tuple[int, int], zmax: int) -> None:
        pyr = Pyramid(*size)
        assert pyr.zmax == zmax
        assert pyr.downsample(zmax) == 1
        assert pyr.grid_size(0) == (1, 1)  # zoom 0 fits the slide in one tile

    def test_grid_sizes_of_the_sample(self) -> None:
        pyr = Pyramid(2220, 2967)
        assert [pyr.grid_size(z) for z in range(5)] == [(1, 1), (2, 2), (3, 3), (5, 6), (9, 12)]
        assert pyr.region(2, 1, 2) == (1024, 2048, 1024, 4)
        assert pyr.valid_size(4, 8, 11) == (2220 - 8 * 256, 2967 - 11 * 256)
        assert pyr.valid_size(3, 0, 0) == (256, 256)

    @pytest.mark.parametrize(("z", "x", "y"), [(5, 0, 0), (-1, 0, 0), (4, 9, 0), (4, 0, 12), (0, 1, 0), (2, -1, 0)])
    def test_out_of_range(self, z: int, x: int, y: int) -> None:
        with pytest.raises(TileRangeError):
            Pyramid(2220, 2967).check(z, x, y)

    def test_latlng_round_trip_and_bounds(self) -> None:
        pyr = Pyramid(2220, 2967)
        lat, lng = pyr.to_latlng(1600, 800)
        assert (lat, lng) == (-800 / 16, 1600 / 16)
        assert pyr.from_latlng(lat, lng) == (1600, 800)
        assert pyr.bounds() == ((-2967 / 16, 0.0), (0.0, 2220 / 16))


class TestSlideTiles:
    def test_top_zoom_is_level_zero(self, sample_svs: Path) -> None:
        with open_slide(sample_svs) as slide:
            pyr = Pyramid(*slide.dimensions)
            tile = _rgb(render_slide_tile(slide, pyr, pyr.zmax, 3, 4))
            direct = slide.read_level((3 * 256, 4 * 256), 0, (256, 256)).astype(np.int16)
            neighbour = slide.read_level((3 * 256, 5 * 256), 0, (256, 256)).astype(np.int16)
        assert tile.shape == (256, 256, 3)
        assert np.abs(tile - direct).mean() < 8  # JPEG q85 noise on fine H&E texture
        assert np.abs(tile - neighbour).mean() > 3 * np.abs(tile - direct).mean()
        assert tile.std() > 10  # tissue, not a blank tile

    def test_levels_agree(self, sample_svs: Path, sample_pyramid: Path) -> None:
        """The one-level SVS (level 0 resized) and the 4-level pyramid (its level 2) give the same zoom-2 tile."""
        with open_slide(sample_svs) as a, open_slide(sample_pyramid) as b:
            pyr = Pyramid(*a.dimensions)
            ta, tb = _rgb(render_slide_tile(a, pyr, 2, 1, 1)), _rgb(render_slide_tile(b, pyr, 2, 1, 1))
        assert ta.std() > 10

        def blocks(t: np.ndarray) -> np.ndarray:  # 16-px block means: resampling filters differ in detail only
            return t.reshape(16, 16, 16, 16, 3).mean(axis=(1, 3))

        assert np.abs(blocks(ta) - blocks(tb)).mean() < 8
        assert np.abs(blocks(ta) - blocks(np.roll(tb, 64, axis=0))).mean() > 16

    def test_edge_tiles_are_padded(self, sample_svs: Path) -> None:
        with open_slide(sample_svs) as slide:
            pyr = Pyramid(*slide.dimensions)
            tile = _rgb(render_slide_tile(slide, pyr, 0, 0, 0))
        w, h = pyr.valid_size(0, 0, 0)
        assert (w, h) == (139, 186)
        # a JPEG block (8 px) away from the slide's edge, the padding is the map's background
        assert np.abs(tile[:, w + 8 :] - np.array(PAD_RGB)).max() < 6
        assert np.abs(tile[h + 8 :, :] - np.array(PAD_RGB)).max() < 6
        assert tile[:h, :w].std() > 10


class TestOverlayTiles:
    def test_palette(self) -> None:
        lut = class_palette([ClassInfo(0, "Background", "#000000"), ClassInfo(1, "Epi", "#c80000"),
                             ClassInfo(2, "Stroma", "#00ff00")])
        assert lut[0].tolist() == [0, 0, 0, 0]
        assert lut[1].tolist() == [200, 0, 0, 255]
        assert lut[2].tolist() == [0, 255, 0, 255]
        assert lut[7, 3] == 0

    def test_label_tile_has_class_colour_on_transparent(self, project: Project) -> None:
        src = TileSource(project)
        tile = _rgba(src.label_tile(1, 1, 0, 0))
        opaque = tile[..., 3] == 255
        assert 0.01 < opaque.mean() < 0.9
        assert (tile[opaque][:, :3] == [200, 0, 0]).all()
        assert (tile[~opaque][:, 3] == 0).all()

    def test_label_tile_matches_rasterised_patch(self, project: Project) -> None:
        """At the top zoom a label tile is the label mask of the same level-0 square."""
        src = TileSource(project)
        pyr = src.slide_info(1).pyramid
        shapes = [(c, g) for _, c, g in project.annotations(1)]
        tile = _rgba(render_label_tile(shapes, class_palette(project.classes()), pyr, 4, 3, 2))
        from al_core.labels import rasterize

        mask = rasterize(shapes, (3 * 256, 2 * 256), 1.0, (256, 256))
        assert ((tile[..., 3] > 0) == (mask > 0)).all()

    def test_empty_tile(self) -> None:
        pyr = Pyramid(1000, 1000)
        assert render_label_tile([], class_palette([]), pyr, 0, 0, 0) == empty_png()
        assert (_rgba(empty_png())[..., 3] == 0).all()

    def test_prediction_tile_outlines(self) -> None:
        mask = np.zeros((256, 256), np.uint8)
        mask[64:192, 64:192] = 1
        tile = _rgba(render_class_tile(mask, class_palette([ClassInfo(1, "Epi", "#c80000")])))
        assert tile[128, 128, 3] == PREDICTION_FILL_ALPHA      # inside: faint
        assert tile[64, 128, 3] == 255 and tile[128, 191, 3] == 255  # outline: opaque
        assert tile[10, 10, 3] == 0 and tile[63, 128, 3] == 0  # background: transparent
        assert (tile[mask > 0][:, :3] == [200, 0, 0]).all()

    def test_paste_patch_classes(self) -> None:
        tile = np.zeros((256, 256), np.uint8)
        classes = np.ones((4, 4), np.uint8)
        classes[:, 2:] = 2
        # a 512-px patch at level-0 (256, 0) into the zoom tile whose pixels are 4 level-0 px, origin (0, 0)
        paste_patch_classes(tile, classes, (256, 0), 512, (0, 0), 4)
        assert (tile[:, :64] == 0).all()          # left of the patch
        assert (tile[:128, 64:128] == 1).all()    # first half of the patch: class 1
        assert (tile[:128, 128:192] == 2).all()
        assert (tile[128:, :] == 0).all()         # below the patch


class TestTileSource:
    def test_cache_hits(self, project: Project) -> None:
        src = TileSource(project)
        a = src.slide_tile(1, 2, 1, 1)
        b = src.slide_tile(1, 2, 1, 1)
        assert a == b and src.cache.hits == 1

    def test_label_tiles_follow_new_versions(self, project: Project, tmp_path: Path) -> None:
        src = TileSource(project)
        before = src.label_tile(1, 4, 0, 0)
        from shapely.geometry import box

        project.correct(1, box(10, 10, 200, 200), 1, author="test")
        after = src.label_tile(1, 4, 0, 0)
        assert before != after
        assert (_rgba(after)[20:40, 20:40, 3] == 255).all()

    def test_unknown_ids_and_range(self, project: Project) -> None:
        src = TileSource(project)
        with pytest.raises(ProjectError):
            src.slide_tile(99, 0, 0, 0)
        with pytest.raises(TileRangeError):
            src.slide_tile(1, 9, 0, 0)
        with pytest.raises(ProjectError, match="no prediction support"):
            src.prediction_tile(1, 1, 0, 0, 0)
        with_loader = TileSource(project, prediction_loader=lambda *a: np.zeros((64, 64), np.uint8))
        with pytest.raises(ProjectError, match="no finished model 3"):
            with_loader.prediction_tile(1, 3, 0, 0, 0)

    def test_missing_file_is_a_slide_error(self, tmp_path: Path, sample_svs: Path) -> None:
        copy = shutil.copy(sample_svs, tmp_path / "gone.svs")
        proj = Project.create(tmp_path / "p")
        sid = proj.add_slide(copy).id
        Path(copy).unlink()
        src = TileSource(proj)
        with pytest.raises(SlideError, match="file not found"):
            src.slide_tile(sid, 0, 0, 0)
        assert src.label_tile(sid, 0, 0, 0) == empty_png()  # labels still work without the file


def test_lru_cache_is_bounded_by_bytes() -> None:
    cache = LRUCache(max_bytes=10)
    cache.put(("a",), b"12345")
    cache.put(("b",), b"12345")
    assert cache.get(("a",)) == b"12345"  # now most recent
    cache.put(("c",), b"123")
    assert cache.get(("b",)) is None and cache.get(("a",)) is not None and len(cache) == 2


def test_core_imports_no_web_or_widget_stack() -> None:
    """al_core (tiles and the app command included) must import without tornado, Jupyter or widgets."""
    import subprocess
    import sys

    code = ("import sys, al_core, al_core.tiles, al_core.cli, al_core.cli.app_cmds\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('tornado', 'jupyter_server', 'ipywidgets', 'ipyleaflet', 'voila', 'slideloop_apps'))\n"
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""
