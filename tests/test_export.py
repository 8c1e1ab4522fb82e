"""ONNX export, metadata, parity with torch, model configs from elsewhere, and the deployed-model registry."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from _deploy_models import SHELL_DIR, SHELL_MODEL, tiny_unet, unet_metadata
from conftest import run_cli

from al_core.errors import ProjectError
from al_core.export import (
    ExportError,
    check_parity,
    export_onnx,
    list_deployed,
    normalise_patches,
    push_model,
)
from al_core.model_config import (
    InferenceConfig,
    ModelConfigError,
    check_against_model,
    load_config,
    parse_fastpathology,
    read_onnx_metadata,
)
from al_core.project import Project
from al_core.slides import open_slide


@pytest.fixture(scope="module")
def real_patches(sample_svs):
    """Eight 128 px patches of real tissue read at 2 µm/px from the bundled sample."""
    with open_slide(sample_svs) as s:
        return np.stack([s.read((300 + 180 * i, 400 + 150 * (i % 4)), (128, 128), target_mpp=2.0)
                         for i in range(8)])


@pytest.fixture(scope="module")
def exported(tmp_path_factory, real_patches):
    path = tmp_path_factory.mktemp("export") / "model.onnx"
    model = tiny_unet()
    cfg = InferenceConfig.from_dict({k: v for k, v in unet_metadata().items() if k != "metrics"})
    report = export_onnx(model, path, unet_metadata(), check_inputs=normalise_patches(real_patches, cfg))
    return path, model, report


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


def test_fastpathology_config(tmp_path):
    text = ("model_name=Tumour-seg\ninput_img_size_x=256\ninput_img_size_y=256\nnb_classes=3\n"
            "class_names=Background;Tumour;Stroma\nclass_colors=0,0,0;255,0,0;0,255,0\nmagnification_level=10\n"
            "patch_overlap=0.125\nmean=0\nstd=1\nscale_factor=1/255\npipeline=pw_tissue_seg.fpl\ncnn_type=unet\n"
            "resolution=high\nmask_threshold=0.05\n")
    f = tmp_path / "model.txt"
    f.write_text(text)
    cfg = load_config(f)
    assert cfg.input_size == (256, 256) and cfg.overlap == 32 and cfg.mpp == pytest.approx(1.0)
    assert [c.name for c in cfg.classes] == ["Background", "Tumour", "Stroma"]
    assert cfg.classes[1].color == "#ff0000" and cfg.scale == pytest.approx(1 / 255)
    assert cfg.activation == "softmax" and cfg.ignored == ("cnn_type", "pipeline", "resolution")
    assert cfg.min_tissue == 0.05
    with pytest.raises(ModelConfigError, match="nb_classes=2 but class_names lists 3"):
        parse_fastpathology(text.replace("nb_classes=3", "nb_classes=2"), "m.txt")
    with pytest.raises(ModelConfigError, match="m.txt: not a FastPathology model file"):
        parse_fastpathology("foo=1\n", "m.txt")


def test_json_and_toml_configs(tmp_path):
    j = tmp_path / "c.json"
    j.write_text(json.dumps({"input_size": [64, 64], "layout": "nhwc", "activation": "sigmoid",
                             "classes": ["bg", "fg"], "magnification": 20}))
    cfg = load_config(j)
    assert cfg.layout == "NHWC" and cfg.mpp == pytest.approx(0.5) and cfg.channel_classes(1) == (1,)
    t = tmp_path / "c.toml"
    t.write_text('[inference]\ninput_size = 96\noverlap = 8\ntarget_mpp = 1.0\nclasses = ["a", "b", "c"]\n')
    assert load_config(t).input_size == (96, 96)
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(ModelConfigError, match="bad.json: not valid JSON"):
        load_config(bad)
    j.write_text(json.dumps({"input_size": 64, "overlap": 64}))
    with pytest.raises(ModelConfigError, match="c.json: invalid inference config: overlap"):
        load_config(j)


def _fixed_model(path, channels: int, size: int) -> None:
    """An ONNX model with a fixed input shape (1 x channels x size x size) and a 2-channel output."""
    from onnx import TensorProto, helper

    w = helper.make_tensor("w", TensorProto.FLOAT, [2, channels, 1, 1], [0.1] * (2 * channels))
    node = helper.make_node("Conv", ["input", "w"], ["out"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                          [1, channels, size, size])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 2, size, size])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_config_must_fit_the_model(tmp_path):
    p = tmp_path / "fixed.onnx"
    _fixed_model(p, 3, 64)
    sess = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
    ok = InferenceConfig(input_size=(64, 64), overlap=8)
    assert check_against_model(ok, sess.get_inputs(), sess.get_outputs(), p) == ("input", "out")
    with pytest.raises(ModelConfigError, match=r"fixed.onnx: .* has 64 height .* needs 128"):
        check_against_model(InferenceConfig(input_size=(128, 128)), sess.get_inputs(), sess.get_outputs(), p)
    with pytest.raises(ModelConfigError, match="3 classes"):
        three = InferenceConfig.from_dict({"input_size": 64, "overlap": 8, "classes": ["a", "b", "c"]})
        check_against_model(three, sess.get_inputs(), sess.get_outputs(), p)
    with pytest.raises(ModelConfigError, match="'nope' not found"):
        check_against_model(ok.with_overrides(output="nope"), sess.get_inputs(), sess.get_outputs(), p)
    from al_core.infer import OnnxSegmenter

    with pytest.raises(ModelConfigError, match="fixed.onnx: has no slideloop metadata; give its settings with --config"):
        OnnxSegmenter(p)
    with pytest.raises(ModelConfigError, match="fixed.onnx: .* has 64 height"):
        OnnxSegmenter(p, InferenceConfig(input_size=(96, 96)))
    gray = tmp_path / "gray.onnx"
    _fixed_model(gray, 1, 64)
    sess = ort.InferenceSession(str(gray), providers=["CPUExecutionProvider"])
    with pytest.raises(ModelConfigError, match="gray.onnx: .* has 1 channels"):
        check_against_model(ok, sess.get_inputs(), sess.get_outputs(), gray)


def test_non_onnx_file_is_a_clear_error(tmp_path, sample_svs):
    with pytest.raises(ModelConfigError, match="CMU-1-Small-Region.svs: not an ONNX model"):
        read_onnx_metadata(sample_svs)
    with pytest.raises(ModelConfigError, match="missing.onnx: model file not found"):
        read_onnx_metadata(tmp_path / "missing.onnx")


def test_push_and_list(tmp_path, exported):
    path, _, _ = exported
    root = tmp_path / "proj"
    Project.create(root).close()
    assert list_deployed(root) == []
    m = push_model(root, path, "tumour-v7")
    assert m.path == root / "deployed" / "tumour-v7" / "model.onnx" and m.path.is_file()
    assert m.config.model_version == "7" and m.info["sha256"]
    with pytest.raises(ProjectError, match="already deployed"):
        push_model(root, path, "tumour-v7")
    push_model(root, path, "tumour-v7", overwrite=True)
    assert [d.name for d in list_deployed(root)] == ["tumour-v7"]
    with pytest.raises(ValueError, match="model name"):
        push_model(root, path, "../escape")
    with pytest.raises(ProjectError, match="not a slideloop project"):
        push_model(tmp_path / "nowhere", path)


@pytest.mark.skipif(not SHELL_MODEL.is_file(), reason="shared SHELL model not present")
def test_push_copies_external_weights(tmp_path):
    src = tmp_path / "shell"
    shutil.copytree(SHELL_DIR, src)
    root = tmp_path / "proj"
    Project.create(root).close()
    m = push_model(root, src / "model_v1.onnx", "shell")
    assert (m.path.parent / "model_v1.onnx.data").is_file() and m.info["config"] is None
    (src / "model_v1.onnx.data").unlink()
    with pytest.raises(ModelConfigError, match="external weights file 'model_v1.onnx.data' is missing"):
        push_model(root, src / "model_v1.onnx", "shell2")


@pytest.mark.slow
def test_cli_export_push_infer_from_project(tmp_path, sample_svs):
    """A project with a trained model version (its checkpoint written directly) → export → push → infer."""
    from al_core.model import build_model, config_from_project, save_checkpoint
    from al_core.store import ModelRow

    root = tmp_path / "proj"
    run_cli("init", str(root), "--classes", "Tissue:#c80000")
    run_cli("add", str(root), str(sample_svs))
    run_cli("grid", str(root), "--patch", "64", "--overlap", "16", "--target-mpp", "2.0")
    with Project.open(root) as proj:
        cfg = config_from_project(proj, encoder="tu-mobilenetv3_small_050", encoder_depth=3,
                                  decoder_channels=(32, 16, 8))
        torch.manual_seed(0)
        save_checkpoint(root / "models" / "m1.pt", build_model(cfg), cfg)
        with proj.store.write() as s:
            s.add(ModelRow(status="done", checkpoint="models/m1.pt", config=json.dumps(cfg.to_dict()),
                           metrics=json.dumps({"iou": 0.5})))
    onnx_path = tmp_path / "m.onnx"
    out = json.loads(run_cli("export", str(root), "--model", "latest", "-o", str(onnx_path), "--push", "v1",
                             "--json").stdout)
    assert out["parity_max_abs_diff"] is not None and out["parity_max_abs_diff"] < 1e-3
    assert out["classes"] == ["Background", "Tissue"] and out["target_mpp"] == 2.0
    props = read_onnx_metadata(onnx_path)
    assert json.loads(props["slideloop.metrics"]) == {"iou": 0.5}
    assert json.loads(props["slideloop.training"])["encoder"] == "tu-mobilenetv3_small_050"
    listed = json.loads(run_cli("deployed", str(root), "--json").stdout)
    assert [m["name"] for m in listed] == ["v1"]
    pred = tmp_path / "pred.tiff"
    res = json.loads(run_cli("infer", str(root / "deployed" / "v1"), str(sample_svs), "-o", str(pred),
                             "--no-geojson", "--json").stdout)[0]
    assert pred.is_file() and res["levels"] >= 3 and res["dimensions"] == [2220, 2967]
    bad = run_cli("export", str(root), "--model", "9", "-o", str(tmp_path / "x.onnx"), check=False)
    assert bad.returncode != 0 and "no model 9" in bad.stderr
