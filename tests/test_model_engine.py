"""The active-learning engine on the bundled real sample: cache, train, predict, rank, retrain, errors.

One tiny model (timm MobileNetV3-small encoder, depth 3, 128 px patches) is trained once per session on the
sample's pre-annotation; tests that change labels work on a copy of that project.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from shapely.geometry import box

from al_core.dataset import PatchCache, PatchDataset
from al_core.errors import CheckpointError, TrainingError
from al_core.grid import GridSpec
from al_core.model import checkpoint_path, load_checkpoint, load_model, resolve_model
from al_core.predict import load_prediction, predict, prediction_classes, stored_metrics
from al_core.project import Project
from al_core.rank import review_queue, scores_frame
from al_core.store import ModelRow
from al_core.train import Progress, TrainOptions, cpu_has_native_bf16, train

TINY = dict(encoder="tu-mobilenetv3_small_050", encoder_depth=3, decoder_channels=(32, 16, 8))
FAST = TrainOptions(epochs=5, batch_size=4, lr=3e-3, max_steps=20, val_fraction=0.1, seed=0)


def make_project(root: Path, svs: Path, geojson: Path | None) -> Project:
    proj = Project.create(root, ["Epithelium:#c80000"])
    proj.add_slide(svs)
    proj.build_grid(GridSpec(patch=128, overlap=0))
    if geojson is not None:
        proj.import_labels(geojson)
    return proj


@pytest.fixture(scope="module")
def trained(tmp_path_factory, sample_svs, sample_geojson) -> tuple[Path, int]:
    """A project with the sample labelled, one trained model and its predictions (engines disposed)."""
    root = tmp_path_factory.mktemp("engine") / "proj"
    with make_project(root, sample_svs, sample_geojson) as proj:
        res = train(proj, FAST, **TINY)
        assert res.status == "done"
        predict(proj, res.model_id, batch_size=16)
    return root, res.model_id


def clone(src: Path, dst: Path) -> Project:
    shutil.copytree(src, dst)
    return Project.open(dst)


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_cache_is_built_once_and_invalidated_by_a_new_grid(tmp_path, sample_svs, monkeypatch):
    with make_project(tmp_path / "p", sample_svs, None) as proj:
        ids = [p.id for p in proj.patches()][:3]
        first = PatchCache(proj).get(ids)
        direct = np.stack([proj.read_patch(proj.patch(i)) for i in ids])
        assert first.dtype == np.uint8 and np.array_equal(first, direct)
        monkeypatch.setattr(Project, "read_patch", lambda *a, **k: pytest.fail("cache re-read a slide"))
        assert np.array_equal(PatchCache(proj).get(ids), first)  # a new instance reuses the files
        monkeypatch.undo()
        old_dir = PatchCache(proj).dir
        proj.build_grid(GridSpec(patch=64, overlap=0))
        cache = PatchCache(proj)
        assert cache.dir != old_dir and not old_dir.exists()
        assert cache.get([proj.patches()[0].id]).shape == (1, 64, 64, 3)


def test_dataset_masks_follow_labels_and_ignore(tmp_path, sample_svs, sample_geojson):
    proj = Project.create(tmp_path / "p", ["Epithelium:#c80000", "Pen:#0000ff:ignore"])
    proj.add_slide(sample_svs)
    proj.build_grid(GridSpec(patch=128, overlap=0))
    proj.import_labels(sample_geojson)
    patch = proj.patches()[0]
    proj.correct(patch.slide_id, box(patch.x, patch.y, patch.x + patch.size / 2, patch.y + patch.size), 2,
                 author="t")
    from al_core.model import config_from_project

    cfg = config_from_project(proj, **TINY)
    assert cfg.class_names == ("Background", "Epithelium") and cfg.ignore_classes == (2,)
    ds = PatchDataset.from_project(proj, [patch.id], cfg)
    item = ds[0]
    assert item["image"].shape == (3, 128, 128) and item["image"].dtype == torch.uint8
    mask = item["mask"].numpy()
    assert (mask[:, :60] == 255).all() and set(np.unique(mask)) <= {0, 1, 255}
    proj.close()


def test_trained_model_version_is_stored(trained):
    root, mid = trained
    with Project.open(root) as proj:
        row = resolve_model(proj, "latest")
        assert row.id == mid and row.status == "done" and row.parent_id is None
        history = json.loads(row.history)
        assert history and history[-1]["steps"] == 20 and all("val_loss" in h for h in history)
        assert json.loads(row.label_versions) == {"CMU-1-Small-Region": 1}
        split = json.loads(row.patches)
        assert len(split["train"]) + len(split["val"]) == len(proj.labelled_patch_ids())
        assert row.wall_time > 0 and json.loads(row.metrics)["epoch"] >= 1
        hp = json.loads(row.hparams)
        assert hp["precision"] == ("bf16" if cpu_has_native_bf16() else "fp32")
        model, cfg = load_model(checkpoint_path(proj, row))
        assert not model.training and cfg.class_names == ("Background", "Epithelium") and cfg.patch == 128


def test_predictions_and_scores_for_every_patch(trained):
    root, mid = trained
    with Project.open(root) as proj:
        patches = proj.patches()
        df = scores_frame(proj, mid)
        assert sorted(df["patch_id"]) == sorted(p.id for p in patches)
        labelled = proj.labelled_patch_ids()
        assert set(df.loc[df["labelled"], "patch_id"]) == labelled
        assert df.loc[df["labelled"], "iou"].between(0, 1).all() and df.loc[~df["labelled"], "iou"].isna().all()
        assert df["entropy"].between(0, 1).all()
        probs = load_prediction(proj, mid, patches[0].id)
        assert probs.shape == (2, 32, 32) and probs.dtype == np.float32
        assert np.allclose(probs.sum(0), 1.0, atol=1e-2)
        cls = prediction_classes(proj, mid, patches[0].id)
        assert cls.shape == (32, 32) and set(np.unique(cls)) <= {0, 1}
        # the model learned something real: better than chance on its labelled patches
        assert df.loc[df["labelled"], "iou"].median() > 0.5
        m = stored_metrics(proj, mid)
        assert 0 < m["all"]["overall"]["macro_iou"] <= 1 and m["stale_patches"] == 0
        queue = review_queue(proj, mid, fraction=0.05)
        assert len(queue) == int(np.ceil(0.05 * len(labelled)))
        assert queue["iou"].iloc[0] == df["iou"].min()


@pytest.mark.slow
def test_deliberately_wrong_label_goes_to_the_top(trained, tmp_path):
    root, mid = trained
    with clone(root, tmp_path / "p") as proj:
        df = scores_frame(proj, mid)
        best = df[df["labelled"]].sort_values("iou").iloc[-1]  # the patch the model agrees with most
        patch = proj.patch(int(best["patch_id"]))
        # relabel it wrongly: every class swapped inside the patch (epithelium ↔ background)
        region = box(patch.x, patch.y, patch.x + patch.size, patch.y + patch.size)
        epi = [g.intersection(region) for _, c, g in proj.annotations(patch.slide_id) if c == 1]
        proj.correct(patch.slide_id, region, 1, author="saboteur")
        for g in epi:
            if not g.is_empty and g.area > 0:
                proj.correct(patch.slide_id, g, None, author="saboteur")
        predict(proj, mid, batch_size=16)
        queue = review_queue(proj, mid, count=3)
        assert int(queue["patch_id"].iloc[0]) == patch.id
        assert queue["iou"].iloc[0] < best["iou"] and queue["iou"].iloc[0] < 0.3


@pytest.mark.slow
def test_retraining_starts_from_the_checkpoint_weights(trained, tmp_path):
    root, mid = trained
    with clone(root, tmp_path / "p") as proj:
        parent = load_checkpoint(checkpoint_path(proj, resolve_model(proj, mid)))
        # a step too small to move any weight: what comes out is what went in
        res = train(proj, TrainOptions(epochs=1, max_steps=1, lr=1e-12, val_fraction=0.1), from_model="latest")
        row = resolve_model(proj, res.model_id)
        assert res.status == "done" and row.parent_id == mid
        child = load_checkpoint(res.checkpoint)
        params = dict(load_model(res.checkpoint)[0].named_parameters())
        for name, p in params.items():
            assert torch.allclose(p, parent.state_dict[name], atol=1e-6), name
        # the Adam state came along (step count continues) and so did the config
        steps = [s["step"] for s in child.optimizer["state"].values()]
        assert min(float(s) for s in steps) == 20 + 1
        assert child.config.class_names == parent.config.class_names


@pytest.mark.slow
def test_cancel_keeps_the_previous_model(trained, tmp_path):
    root, mid = trained
    with clone(root, tmp_path / "p") as proj:
        ckpt = checkpoint_path(proj, resolve_model(proj, mid))
        digest = _sha(ckpt)
        stop = threading.Event()
        seen: list[Progress] = []

        def on_progress(p: Progress) -> None:
            seen.append(p)
            if p.event == "step":
                stop.set()  # the "Stop" button, pressed during the first step

        res = train(proj, FAST, from_model=mid, progress=on_progress, cancel=stop)
        assert res.status == "cancelled" and res.checkpoint is None
        assert [p.event for p in seen][:2] == ["start", "step"] and seen[-1].event == "end"
        assert _sha(ckpt) == digest and resolve_model(proj, "latest").id == mid
        with proj.store.read() as s:
            assert s.get(ModelRow, res.model_id).status == "cancelled"


@pytest.mark.slow
def test_out_of_memory_retries_with_a_smaller_batch(trained, tmp_path, monkeypatch):
    import al_core.train as train_mod

    real = train_mod.preprocess

    def small_memory(images, config):
        if images.shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(images, config)

    monkeypatch.setattr(train_mod, "preprocess", small_memory)
    root, _ = trained
    with clone(root, tmp_path / "p") as proj:
        res = train(proj, TrainOptions(epochs=1, max_steps=1, batch_size=8, val_fraction=0.1), **TINY)
        assert res.status == "done"
        assert any("retrying epoch 1 with batch size 4" in n for n in res.notes)
        assert any("batch size 2" in n for n in res.notes)


def test_no_labels_and_single_class_are_clear_errors(tmp_path, sample_svs):
    with make_project(tmp_path / "p", sample_svs, None) as proj:
        with pytest.raises(TrainingError, match="no labelled patches"):
            train(proj, FAST, **TINY)
        proj.mark_reviewed(proj.patches()[0].id, author="t")  # reviewed: all background
        with pytest.raises(TrainingError, match=r"only one class \(Background\)"):
            train(proj, FAST, **TINY)
        with proj.store.read() as s:
            assert s.query(ModelRow).count() == 0  # nothing half-made in the store


def test_corrupt_checkpoint_of_a_model_version(trained, tmp_path):
    root, mid = trained
    with clone(root, tmp_path / "p") as proj:
        ckpt = checkpoint_path(proj, resolve_model(proj, mid))
        ckpt.write_bytes(ckpt.read_bytes()[:1000])
        with pytest.raises(CheckpointError, match="model.pt: not a readable checkpoint"):
            train(proj, FAST, from_model=mid)
        with pytest.raises(CheckpointError, match="not a readable checkpoint"):
            predict(proj, mid)


def test_model_for_another_class_set_is_refused(trained, tmp_path, sample_svs):
    root, mid = trained
    other = Project.create(tmp_path / "other", ["Tumour:#c80000", "Stroma:#00a000"])
    other.add_slide(sample_svs)
    other.build_grid(GridSpec(patch=128, overlap=0))
    with Project.open(root) as proj:
        shutil.copy(checkpoint_path(proj, resolve_model(proj, mid)), tmp_path / "other" / "m.pt")
    with other.store.write() as s:
        s.add(ModelRow(status="done", checkpoint="m.pt"))
    with pytest.raises(CheckpointError, match="trained for classes"):
        train(other, FAST, from_model="latest")
    with pytest.raises(CheckpointError, match="trained for classes"):
        predict(other, "latest")
    other.close()


def test_batched_label_masks_equal_project_label_mask(trained):
    from al_core.dataset import label_masks
    from al_core.model import config_from_project

    root, _ = trained
    with Project.open(root) as proj:
        cfg = config_from_project(proj, **TINY)
        patches = proj.patches()
        fast = label_masks(proj, patches, cfg)
        slow = np.stack([cfg.mask_lut()[proj.label_mask(p)] for p in patches])
        assert np.array_equal(fast, slow) and 0 < (fast == 1).mean() < 1
