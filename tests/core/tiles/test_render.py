"""Tile rendering (al_core.tiles.render) on the bundled real sample: slide JPEGs, label and prediction overlays."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from al_core.project.classes import ClassInfo
from al_core.project.project import Project
from al_core.tiles.pyramid import Pyramid
from al_core.tiles.render import (
    LABEL_FILL_ALPHA,
    PAD_RGB,
    PREDICTION_FILL_ALPHA,
    class_map_lut,
    class_palette,
    default_lut,
    empty_png,
    paste_patch_classes,
    render_class_tile,
    render_label_tile,
    render_overlay_tile,
    render_slide_tile,
)
from al_core.tiles.source import TileSource
from al_core.wsi.grid import GridSpec
from al_core.wsi.slides import open_slide


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
        opaque = tile[..., 3] == 255  # the outline; inside, a light fill that keeps nuclei visible
        assert 0.001 < opaque.mean() < 0.5
        assert (tile[tile[..., 3] > 0][:, :3] == [200, 0, 0]).all()
        assert set(np.unique(tile[..., 3])) == {0, LABEL_FILL_ALPHA, 255}

    def test_label_tile_matches_rasterised_patch(self, project: Project) -> None:
        """At the top zoom a label tile is the label mask of the same level-0 square."""
        src = TileSource(project)
        pyr = src.slide_info(1).pyramid
        shapes = [(c, g) for _, c, g in project.annotations(1)]
        tile = _rgba(render_label_tile(shapes, class_palette(project.classes()), pyr, 4, 3, 2))
        from al_core.wsi.raster import rasterize

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

    def test_class_map_overlay_colours_and_background(self) -> None:
        lut = class_map_lut([{"index": 0, "name": "Background", "color": "#000000"},
                             {"index": 2, "name": "Tumour", "color": "#c80000"}])
        assert lut[0, 3] == 0 and lut[2].tolist()[:3] == [200, 0, 0] and lut[2, 3] > 0
        mask = np.zeros((256, 256), np.uint8)
        mask[:, 128:] = 2
        tile = _rgba(render_overlay_tile(mask, lut))
        assert (tile[:, :120, 3] == 0).all() and (tile[:, 140:, :3] == [200, 0, 0]).all()
        assert (tile[:, 128, 3] == 255).all()  # the outline is opaque
        assert default_lut()[1, 3] > 0 and default_lut()[0, 3] == 0
