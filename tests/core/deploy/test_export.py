"""ONNX export (al_core.deploy.export): metadata, dynamic axes, parity with torch, atomic files; and a project's
model version exported through the facade (al_core.deploy.project_export)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from _deploy_models import tiny_unet, unet_metadata

from al_core.deploy.config import InferenceConfig
from al_core.deploy.export import check_parity, export_onnx, normalise_patches
from al_core.deploy.onnx_io import read_onnx_metadata
from al_core.errors import ExportError, NoModelError
from al_core.project.project import Project


def test_export_writes_metadata_and_dynamic_axes(exported):
    path, _, report = exported
    m = onnx.load(str(path))
    assert max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) >= 17
    props = {p.key: p.value for p in m.metadata_props}
    assert json.loads(props["slideloop.classes"])[1] == {"index": 1, "name": "Tumour", "color": "#c80000"}
    assert json.loads(props["slideloop.metrics"]) == {"iou": 0.61, "dice": 0.72}
    assert json.loads(props["slideloop.mean"]) == pytest.approx([0.485, 0.456, 0.406])
    assert json.loads(props["slideloop.target_mpp"]) == 2.0
    assert json.loads(props["slideloop.channel_order"]) == "RGB"
    assert "slideloop.slideloop_version" in props and json.loads(props["slideloop.model_version"]) == "7"
    cfg = InferenceConfig.from_metadata(props)
    assert cfg.input_size == (128, 128) and cfg.overlap == 16 and cfg.threshold == 0.5
    assert [c.name for c in cfg.classes] == ["Background", "Tumour"]
    # batch and spatial size are dynamic
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"input": np.zeros((3, 3, 96, 160), np.float32)})[0]
    assert out.shape == (3, 2, 96, 160)
    assert report is not None and report.ok and report.n_inputs == 8


def test_parity_on_real_patches_and_detects_a_difference(exported, real_patches):
    path, model, _ = exported
    cfg = InferenceConfig.from_metadata(read_onnx_metadata(path))
    x = normalise_patches(real_patches, cfg)
    rep = check_parity(model, path, x)
    assert rep.max_abs_diff < 1e-3 and rep.ok
    # a model that differs from the file must be caught
    other = tiny_unet(seed=1)
    assert not check_parity(other, path, x[:2]).ok


def test_failed_export_leaves_previous_file(tmp_path):
    class Broken(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("unsupported op")

    target = tmp_path / "m.onnx"
    target.write_bytes(b"previous")
    with pytest.raises(ExportError, match="m.onnx: ONNX export failed"):
        export_onnx(Broken(), target, unet_metadata())
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]
    with pytest.raises(ExportError, match="unknown key"):
        export_onnx(tiny_unet(), tmp_path / "x.onnx", unet_metadata(colour="red"))


def test_project_model_exports_with_its_settings_and_pushes(trained, tmp_path):
    """The session's trained model through ``Project.export``: settings from the checkpoint and the model row."""
    root, mid = trained
    with Project.open(root) as proj:
        out = proj.export(tmp_path / "m.onnx", "latest", push="epi")
        assert out.model_id == mid and out.path == tmp_path / "m.onnx" and out.parity.ok
        assert out.parity.n_inputs == 4 and out.parity.max_abs_diff < 1e-3  # four real patches of the grid
        cfg = out.config
        assert [c.name for c in cfg.classes] == ["Background", "Epithelium"] and cfg.input_size == (128, 128)
        # the grid was cut at the default scale (1 µm/px) without overlap: the model runs the same way
        assert cfg.target_mpp == 1.0 and cfg.overlap == 0 and cfg.model_version == str(mid)
        props = read_onnx_metadata(out.path)
        training = json.loads(props["slideloop.training"])
        assert training["encoder"] == "tu-mobilenetv3_small_050" and training["label_versions"] == {
            "CMU-1-Small-Region": 1}
        assert json.loads(props["slideloop.metrics"])["epoch"] >= 1
        assert out.deployed.name == "epi" and [m.name for m in proj.deployed()] == ["epi"]
        assert out.deployed.config == cfg
        overlap = proj.export(tmp_path / "o.onnx", mid, overlap=16, push="epi", overwrite=True)
        assert overlap.config.overlap == 16 and proj.deployed()[0].config.overlap == 16
        with pytest.raises(Exception, match="already deployed"):
            proj.export(tmp_path / "x.onnx", mid, push="epi")
    with Project.create(tmp_path / "empty") as empty, pytest.raises(NoModelError, match="no trained model yet"):
        empty.export(tmp_path / "y.onnx")
