"""Patch pixels and masks (al_core.learn.dataset): the per-grid cache, masks from label geometry, the dataset."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _engine import TINY, make_project
from shapely.geometry import box

from al_core import GridSpec, NoGridError, Project
from al_core.learn import dataset as dataset_mod
from al_core.learn.dataset import PatchCache, PatchDataset, label_masks, open_cache
from al_core.learn.model import config_for


def test_cache_is_built_once_and_invalidated_by_a_new_grid(tmp_path, sample_svs, monkeypatch):
    with make_project(tmp_path / "p", sample_svs, None) as proj:
        ids = [p.id for p in proj.patches()][:3]
        first = open_cache(proj).get(ids)
        direct = np.stack([proj.read_patch(proj.patch(i)) for i in ids])
        assert first.dtype == np.uint8 and np.array_equal(first, direct)
        monkeypatch.setattr(dataset_mod, "read_patch", lambda *a, **k: pytest.fail("cache re-read a slide"))
        assert np.array_equal(open_cache(proj).get(ids), first)  # a new instance reuses the files
        monkeypatch.undo()
        old_dir = open_cache(proj).dir
        proj.build_grid(GridSpec(patch=64, overlap=0))
        cache = open_cache(proj)
        assert cache.dir != old_dir and not old_dir.exists()
        assert cache.get([proj.patches()[0].id]).shape == (1, 64, 64, 3)


def test_low_level_cache_reads_only_missing_rows(tmp_path, sample_svs):
    """PatchCache(cache_dir, grid_id, patches, open_slide) needs no project: rows, a folder and an opener."""
    with make_project(tmp_path / "p", sample_svs, None) as proj:
        patches, gid = proj.patches(), proj.grid_id()
        opened: list[int] = []

        def opener(slide_id: int):
            opened.append(slide_id)
            return proj.open_slide(slide_id)

        cache = PatchCache(tmp_path / "cache", gid, patches, opener)
        assert cache.dir == tmp_path / "cache" / f"grid-{gid}" and not cache.filled.any()
        got = cache.get([patches[5].id, patches[2].id])
        assert np.array_equal(got[0], proj.read_patch(patches[5])) and opened == [patches[0].slide_id]
        assert cache.filled.sum() == 2 and cache.rows([patches[2].id]).tolist() == [2]
        cache.get([patches[2].id])
        assert opened == [patches[0].slide_id]  # nothing new to read: the slide was not opened again
        # a crash after the pixels but before filled.npy: the rows count as unfilled and are read again
        (cache.dir / "filled.npy").write_bytes(b"garbage")
        again = PatchCache(tmp_path / "cache", gid, patches, opener)
        assert not again.filled.any()
        with pytest.raises(Exception, match="not in the current grid"):
            again.rows([10**6])
    with pytest.raises(NoGridError, match="no patches"):
        PatchCache(tmp_path / "cache", 7, [], opener)


def test_open_cache_needs_a_grid(tmp_path):
    with Project.create(tmp_path / "p") as proj, pytest.raises(NoGridError, match="no patch grid yet"):
        open_cache(proj)


def test_dataset_masks_follow_labels_and_ignore(tmp_path, sample_svs, sample_geojson):
    proj = Project.create(tmp_path / "p", ["Epithelium:#c80000", "Pen:#0000ff:ignore"])
    proj.add_slide(sample_svs)
    proj.build_grid(GridSpec(patch=128, overlap=0))
    proj.import_labels(sample_geojson)
    patch = proj.patches()[0]
    proj.correct(patch.slide_id, box(patch.x, patch.y, patch.x + patch.size / 2, patch.y + patch.size), 2,
                 author="t")
    cfg = config_for(proj.classes(), proj.grid_spec(), **TINY)
    assert cfg.class_names == ("Background", "Epithelium") and cfg.ignore_classes == (2,)
    images = open_cache(proj).get([patch.id])
    ds = PatchDataset(images, label_masks([patch], proj.labels.annotations, cfg), [patch.id])
    item = ds[0]
    assert item["image"].shape == (3, 128, 128) and item["image"].dtype == torch.uint8
    assert item["patch_id"] == patch.id and len(ds) == 1
    mask = item["mask"].numpy()
    assert (mask[:, :60] == 255).all() and set(np.unique(mask)) <= {0, 1, 255}
    with pytest.raises(ValueError, match="do not match"):
        PatchDataset(images, np.zeros((2, 128, 128), np.uint8), [patch.id])
    proj.close()


def test_dataset_applies_its_transform_per_sample():
    images = np.zeros((2, 8, 8, 3), np.uint8)
    masks = np.ones((2, 8, 8), np.uint8)
    seen = []

    def flip(img, mask):
        seen.append(img.shape)
        return img[:, ::-1] + 1, mask[:, ::-1] * 0

    item = PatchDataset(images, masks, [10, 11], transform=flip)[1]
    assert seen == [(8, 8, 3)] and item["patch_id"] == 11
    assert (item["image"] == 1).all() and (item["mask"] == 0).all() and item["mask"].dtype == torch.int64


def test_batched_label_masks_equal_project_label_mask(trained):
    root, _ = trained
    with Project.open(root) as proj:
        cfg = config_for(proj.classes(), proj.grid_spec(), **TINY)
        patches = proj.patches()
        fast = label_masks(patches, proj.labels.annotations, cfg)
        slow = np.stack([cfg.mask_lut()[proj.label_mask(p)] for p in patches])
        assert np.array_equal(fast, slow) and 0 < (fast == 1).mean() < 1
