"""Training a model version (al_core.learn.train) on the bundled real sample: what is stored, incremental
retraining, cancel, the out-of-memory retry and clear errors. The session's tiny model comes from conftest's
``trained`` fixture; tests that change the project work on a copy."""

from __future__ import annotations

import json
import shutil
import threading

import pytest
import torch
from _engine import FAST, TINY, clone, make_project, sha

from al_core import NoGridError
from al_core.errors import CheckpointError, TrainingError
from al_core.learn.checkpoint import load_checkpoint, load_model
from al_core.learn.device import cpu_has_native_bf16
from al_core.learn.predict import predict
from al_core.learn.train import Progress, TrainOptions, split_indices, train
from al_core.project.project import Project
from al_core.project.schema import ModelRow
from al_core.wsi.grid import GridSpec


def test_trained_model_version_is_stored(trained):
    root, mid = trained
    with Project.open(root) as proj:
        row = proj.models.resolve("latest")
        assert row.id == mid and row.status == "done" and row.parent_id is None
        history = json.loads(row.history)
        assert history and history[-1]["steps"] == 20 and all("val_loss" in h for h in history)
        assert json.loads(row.label_versions) == {"CMU-1-Small-Region": 1}
        split = json.loads(row.patches)
        assert len(split["train"]) + len(split["val"]) == len(proj.labelled_patch_ids())
        assert row.wall_time > 0 and json.loads(row.metrics)["epoch"] >= 1
        hp = json.loads(row.hparams)
        assert hp["precision"] == ("bf16" if cpu_has_native_bf16() else "fp32")
        ckpt = proj.models.checkpoint(row)
        assert ckpt == proj.models.folder(mid) / "model.pt" == root / "models" / str(mid) / "model.pt"
        model, cfg = load_model(ckpt)
        assert not model.training and cfg.class_names == ("Background", "Epithelium") and cfg.patch == 128
        assert [m.id for m in proj.models.list()] == [mid] and proj.models.get(mid).id == mid
        assert proj.models.get(99) is None


def test_model_references(trained):
    root, mid = trained
    with Project.open(root) as proj:
        assert proj.models.resolve(None).id == proj.models.resolve(str(mid)).id == proj.models.resolve(mid).id
        with pytest.raises(Exception, match="no model 9"):
            proj.models.resolve(9)
        with pytest.raises(ValueError, match="expected 'active', 'latest' or a model id"):
            proj.models.resolve("newest")


def test_split_indices_is_seeded_and_keeps_one_of_each():
    tr, va = split_indices(10, 0.2, 0)
    assert len(va) == 2 and sorted([*tr, *va]) == list(range(10))
    assert [a.tolist() for a in split_indices(10, 0.2, 0)] == [tr.tolist(), va.tolist()]
    assert [len(a) for a in split_indices(2, 0.01, 0)] == [1, 1]  # at least one validation patch
    assert [len(a) for a in split_indices(5, 0.0, 0)] == [5, 0]
    with pytest.raises(ValueError, match="val_fraction"):
        TrainOptions(val_fraction=1.0)
    with pytest.raises(ValueError, match="precision"):
        TrainOptions(precision="fp8")


@pytest.mark.slow
def test_retraining_starts_from_the_checkpoint_weights(trained, tmp_path):
    root, mid = trained
    with clone(root, tmp_path / "p") as proj:
        parent = load_checkpoint(proj.models.checkpoint(proj.models.resolve(mid)))
        # a step too small to move any weight: what comes out is what went in
        res = train(proj, TrainOptions(epochs=1, max_steps=1, lr=1e-12, val_fraction=0.1), from_model="latest")
        row = proj.models.resolve(res.model_id)
        assert res.status == "done" and row.parent_id == mid
        child = load_checkpoint(res.checkpoint)
        params = dict(load_model(res.checkpoint)[0].named_parameters())
        for name, p in params.items():
            assert torch.allclose(p, parent.state_dict[name], atol=1e-6), name
        # the Adam state came along (step count continues) and so did the config
        steps = [s["step"] for s in child.optimizer["state"].values()]
        assert min(float(s) for s in steps) == 20 + 1
        assert child.config.class_names == parent.config.class_names
        with pytest.raises(TrainingError, match="uses encoder 'tu-mobilenetv3_small_050'"):
            train(proj, FAST, from_model=mid, encoder="resnet18")


@pytest.mark.slow
def test_cancel_keeps_the_previous_model(trained, tmp_path):
    root, mid = trained
    with clone(root, tmp_path / "p") as proj:
        ckpt = proj.models.checkpoint(proj.models.resolve(mid))
        digest = sha(ckpt)
        stop = threading.Event()
        seen: list[Progress] = []

        def on_progress(p: Progress) -> None:
            seen.append(p)
            if p.event == "step":
                stop.set()  # the "Stop" button, pressed during the first step

        res = train(proj, FAST, from_model=mid, progress=on_progress, cancel=stop)
        assert res.status == "cancelled" and res.checkpoint is None
        assert [p.event for p in seen][:2] == ["start", "step"] and seen[-1].event == "end"
        assert sha(ckpt) == digest and proj.models.resolve("latest").id == mid
        with proj.store.read() as s:
            assert s.get(ModelRow, res.model_id).status == "cancelled"


@pytest.mark.slow
def test_out_of_memory_retries_with_a_smaller_batch(trained, tmp_path, monkeypatch):
    import al_core.learn.fit as fit_mod

    real = fit_mod.preprocess

    def small_memory(images, config):
        if images.shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(images, config)

    monkeypatch.setattr(fit_mod, "preprocess", small_memory)
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


def test_no_grid_is_a_clear_error(tmp_path):
    with Project.create(tmp_path / "p") as proj, pytest.raises(NoGridError, match="no patch grid yet"):
        train(proj, FAST, **TINY)


def test_corrupt_checkpoint_of_a_model_version(trained, tmp_path):
    root, mid = trained
    with clone(root, tmp_path / "p") as proj:
        ckpt = proj.models.checkpoint(proj.models.resolve(mid))
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
        shutil.copy(proj.models.checkpoint(proj.models.resolve(mid)), tmp_path / "other" / "m.pt")
    with other.store.write() as s:
        s.add(ModelRow(status="done", checkpoint="m.pt"))
    with pytest.raises(CheckpointError, match="trained for classes"):
        train(other, FAST, from_model="latest")
    with pytest.raises(CheckpointError, match="trained for classes"):
        predict(other, "latest")
    other.close()
