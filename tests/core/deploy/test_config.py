"""Inference configs (al_core.deploy.config, onnx_io, fastpathology): from ONNX metadata, JSON/TOML files and
FastPathology model files, and checked against the model's inputs and outputs."""

from __future__ import annotations

import json

import onnx
import onnxruntime as ort
import pytest

from al_core.deploy.config import InferenceConfig
from al_core.deploy.fastpathology import parse_fastpathology
from al_core.deploy.onnx_io import check_against_model, load_config, read_onnx_metadata
from al_core.errors import ModelConfigError


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
    from al_core.deploy.segmenter import OnnxSegmenter

    with pytest.raises(ModelConfigError, match="fixed.onnx: has no slideloop metadata; give its settings in a config file"):
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
