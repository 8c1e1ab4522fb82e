"""Tiles of one project (al_core.tiles.source): slide, label and prediction tiles, the cache, unknown ids."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from al_core.errors import ProjectError, SlideError, TileRangeError
from al_core.project.project import Project
from al_core.tiles.render import PREDICTION_FILL_ALPHA, empty_png, paste_patch_classes
from al_core.tiles.source import TileSource
from al_core.wsi.grid import GridSpec


def _rgba(data: bytes) -> np.ndarray:
    im = Image.open(io.BytesIO(data))
    assert im.mode == "RGBA"
    return np.asarray(im)


def _project(folder: Path, svs: Path, geojson: Path) -> Project:
    proj = Project.create(folder)
    proj.add_slide(svs)
    proj.build_grid(GridSpec(patch=256))
    proj.import_labels(geojson)
    return proj


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, sample_svs: Path, sample_geojson: Path):
    """The sample with its labels on a 256 px grid; tests here only read it."""
    proj = _project(tmp_path_factory.mktemp("tiles") / "proj", sample_svs, sample_geojson)
    yield proj
    proj.close()


class TestTileSource:
    def test_cache_hits(self, project: Project) -> None:
        src = TileSource(project)
        a = src.slide_tile(1, 2, 1, 1)
        b = src.slide_tile(1, 2, 1, 1)
        assert a == b and src.cache.hits == 1

    def test_label_tiles_follow_new_versions(self, tmp_path: Path, sample_svs: Path, sample_geojson: Path) -> None:
        own = _project(tmp_path / "p", sample_svs, sample_geojson)  # changed here: not the shared project
        src = TileSource(own)
        before = src.label_tile(1, 4, 0, 0)
        from shapely.geometry import box

        own.correct(1, box(10, 10, 200, 200), 1, author="test")
        after = src.label_tile(1, 4, 0, 0)
        assert before != after
        assert (_rgba(after)[20:40, 20:40, 3] > 0).all()  # painted (outline or light fill)
        own.close()

    def test_unknown_ids_and_range(self, project: Project) -> None:
        src = TileSource(project)
        with pytest.raises(ProjectError):
            src.slide_tile(99, 0, 0, 0)
        with pytest.raises(TileRangeError):
            src.slide_tile(1, 9, 0, 0)
        # predictions come from the project's own store: a model it does not have is an error
        with pytest.raises(ProjectError, match="no finished model 1 in the project"):
            src.prediction_tile(1, 1, 0, 0, 0)
        with pytest.raises(ProjectError, match="no finished model 3"):
            src.prediction_tile(1, 3, 0, 0, 0)

    def test_missing_file_is_a_slide_error(self, tmp_path: Path, sample_svs: Path) -> None:
        copy = shutil.copy(sample_svs, tmp_path / "gone.svs")
        proj = Project.create(tmp_path / "p")
        sid = proj.add_slide(copy).id
        Path(copy).unlink()
        src = TileSource(proj)
        with pytest.raises(SlideError, match="file not found"):
            src.slide_tile(sid, 0, 0, 0)
        assert src.label_tile(sid, 0, 0, 0) == empty_png()  # labels still work without the file

    def test_prediction_tile_pastes_the_stored_patch_predictions(self, trained: tuple[Path, int]) -> None:
        root, mid = trained
        with Project.open(root) as proj:
            src = TileSource(proj)
            pyr = src.slide_info(1).pyramid
            z = pyr.zmax - 1  # 2 level-0 px per tile pixel
            expected = np.zeros((256, 256), np.uint8)
            x0, y0, side, ds = pyr.region(z, 2, 3)
            for p in proj.patches(1):
                if p.x < x0 + side and p.y < y0 + side and p.x + p.size > x0 and p.y + p.size > y0:
                    paste_patch_classes(expected, proj.predictions.classes(mid, p.id), (p.x, p.y), p.size,
                                        (x0, y0), ds)
            assert 0 < (expected == 1).mean() < 1  # both classes predicted here
            tile = _rgba(src.prediction_tile(1, mid, z, 2, 3))
            assert ((tile[..., 3] > 0) == (expected == 1)).all()
            assert (tile[expected == 1][:, :3] == [200, 0, 0]).all()
            assert set(np.unique(tile[..., 3])) <= {0, PREDICTION_FILL_ALPHA, 255}
            assert src.prediction_tile(1, mid, z, 2, 3) == src.prediction_tile(1, mid, z, 2, 3)
            assert src.cache.hits == 2  # rendered once, then served from the cache
            src.close()
