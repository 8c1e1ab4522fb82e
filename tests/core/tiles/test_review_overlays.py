"""The review map's legible overlays: labels as outline + light fill, the error map of a model against the
current labels (false positives / negatives), and smooth vector contours of a patch's prediction."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from shapely.geometry import box

from al_core.project.project import Project
from al_core.tiles.contours import smooth_contours
from al_core.tiles.render import ERROR_RGBA, empty_png, error_classes, paste_patch_classes, render_error_tile
from al_core.tiles.source import TileSource
from al_core.wsi.raster import rasterize


def _rgba(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGBA"))


def test_error_classes_and_colours() -> None:
    pred = np.array([[1, 1, 0, 0, 2]], np.uint8)
    label = np.array([[1, 0, 1, 0, 1]], np.uint8)
    covered = np.array([[True, True, True, True, False]])
    err = error_classes(pred, label, covered)
    assert err.tolist() == [[0, 1, 2, 0, 0]]  # agree, FP, FN, agree, not predicted
    tile = _rgba(render_error_tile(np.tile(err, (5, 1))))
    assert tuple(tile[0, 1]) == ERROR_RGBA["fp"] and tuple(tile[0, 2]) == ERROR_RGBA["fn"]
    assert tile[0, 0, 3] == 0 and tile[0, 4, 3] == 0
    assert render_error_tile(np.zeros((256, 256), np.uint8)) == empty_png()


def test_contours_are_smooth_and_keep_the_region() -> None:
    classes = np.zeros((64, 64), np.uint8)
    yy, xx = np.mgrid[:64, :64]
    classes[(yy - 32) ** 2 + (xx - 30) ** 2 < 15**2] = 1  # a pixelated disc
    classes[2, 60] = 1  # a one-pixel speck
    (cls, geom), = smooth_contours(classes, offset=(1000, 500), scale=4)
    raw_area = (classes == 1).sum() * 16
    assert cls == 1 and abs(geom.area - raw_area) < 0.06 * raw_area
    assert geom.geom_type == "Polygon"  # the speck is gone
    assert len(geom.exterior.coords) > 30  # rounded, not 4-connected stair-steps turned into a few corners
    raw_edges = len(rasterize([(1, geom)], (1000, 500), 4, (64, 64)))  # still maps to the same pixels
    assert raw_edges == 64
    assert geom.within(box(1000, 500, 1000 + 256, 500 + 256))


def test_error_tile_marks_where_prediction_and_label_disagree(trained: tuple[Path, int], tmp_path: Path) -> None:
    src_root, mid = trained
    root = tmp_path / "proj"
    shutil.copytree(src_root, root)
    with Project.open(root) as proj:
        src = TileSource(proj)
        pyr = src.slide_info(1).pyramid
        z, tx, ty = pyr.zmax - 1, 2, 3
        x0, y0, side, ds = pyr.region(z, tx, ty)
        labelled = proj.labelled_patch_ids(1)
        pred = np.zeros((256, 256), np.uint8)
        covered = np.zeros((256, 256), np.uint8)
        for p in proj.patches(1):
            if p.id in labelled and p.x < x0 + side and p.y < y0 + side and p.x + p.size > x0 and p.y + p.size > y0:
                classes = proj.predictions.classes(mid, p.id)
                paste_patch_classes(pred, classes, (p.x, p.y), p.size, (x0, y0), ds)
                paste_patch_classes(covered, np.ones_like(classes), (p.x, p.y), p.size, (x0, y0), ds)
        label = rasterize([(a.class_idx, a.geometry) for a in proj.annotations(1)], (x0, y0), ds, (256, 256))
        want = error_classes(pred, label, covered.astype(bool))
        assert (want == 1).any() or (want == 2).any()  # a tiny model disagrees somewhere here
        tile = _rgba(src.error_tile(1, mid, z, tx, ty))
        assert ((tile[..., 3] > 0) == (want > 0)).all()
        # a correction that paints the whole tile as the label class changes the map at once (new version)
        proj.correct(1, box(x0, y0, x0 + side, y0 + side), 1, author="t")
        after = _rgba(src.error_tile(1, mid, z, tx, ty))
        fn_now = (after[..., :3] == ERROR_RGBA["fn"][:3]).all(-1) & (after[..., 3] > 0)
        assert not (after[..., :3][after[..., 3] > 0] == ERROR_RGBA["fp"][:3]).all(-1).any()  # label 1 everywhere
        assert fn_now.sum() >= ((pred == 0) & (want == 2)).sum()
        src.close()
