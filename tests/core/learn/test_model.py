"""The model (al_core.learn.model) and its checkpoints (al_core.learn.checkpoint): configs, round trips,
corrupt and foreign files, another class set or architecture."""

from __future__ import annotations

import pytest
import torch

from al_core import ClassInfo, GridSpec
from al_core.errors import CheckpointError
from al_core.learn.checkpoint import load_checkpoint, load_model, load_weights, save_checkpoint
from al_core.learn.model import ModelConfig, build_model, check_classes, config_for, preprocess

TINY = dict(encoder="tu-mobilenetv3_small_050", encoder_depth=3, decoder_channels=(16, 8, 8), patch=64)


def tiny_config(**kw) -> ModelConfig:
    base = dict(class_idx=(0, 1), class_names=("Background", "Epithelium"), class_colors=("#000000", "#c80000"))
    return ModelConfig(**(base | TINY | kw))


class TestCheckpoints:
    def test_round_trip(self, tmp_path):
        cfg = tiny_config()
        torch.manual_seed(0)
        model = build_model(cfg)
        path = save_checkpoint(tmp_path / "m.pt", model, cfg, extra={"epoch": 3})
        loaded, cfg2 = load_model(path)
        assert cfg2 == cfg and not loaded.training
        x = torch.rand(1, 3, 64, 64)
        with torch.no_grad():
            assert torch.allclose(model.eval()(x), loaded(x))
        assert load_checkpoint(path).extra == {"epoch": 3}

    def test_corrupt_and_foreign_files(self, tmp_path):
        bad = tmp_path / "bad.pt"
        bad.write_bytes(b"not a checkpoint at all")
        with pytest.raises(CheckpointError, match=r"bad\.pt: not a readable checkpoint"):
            load_checkpoint(bad)
        cfg = tiny_config()
        good = save_checkpoint(tmp_path / "good.pt", build_model(cfg), cfg)
        trunc = tmp_path / "trunc.pt"
        trunc.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
        with pytest.raises(CheckpointError, match="trunc.pt: not a readable checkpoint"):
            load_model(trunc)
        other = tmp_path / "other.pt"
        torch.save({"state_dict": {}}, other)
        with pytest.raises(CheckpointError, match="not a slideloop model checkpoint"):
            load_checkpoint(other)
        with pytest.raises(CheckpointError, match="checkpoint file not found"):
            load_checkpoint(tmp_path / "missing.pt")

    def test_other_class_set_or_architecture(self, tmp_path):
        cfg = tiny_config()
        path = save_checkpoint(tmp_path / "m.pt", build_model(cfg), cfg)
        ckpt = load_checkpoint(path)
        three = tiny_config(class_idx=(0, 1, 2), class_names=("Background", "Epithelium", "Stroma"),
                            class_colors=("#000000", "#c80000", "#00a000"))
        with pytest.raises(CheckpointError, match="does not match the requested"):
            load_weights(build_model(three), ckpt, path, expected=three)
        renamed = tiny_config(class_names=("Background", "Tumour"))
        with pytest.raises(CheckpointError, match="classes .* differ"):
            load_weights(build_model(renamed), ckpt, path, expected=renamed)
        wider = tiny_config(decoder_channels=(32, 16, 8))
        with pytest.raises(CheckpointError, match="weights do not fit"):
            load_weights(build_model(wider), ckpt, path)

    def test_config_validation(self):
        with pytest.raises(ValueError, match="at least 2 classes"):
            tiny_config(class_idx=(0,), class_names=("Background",), class_colors=("#000000",))
        with pytest.raises(ValueError, match="multiple of 8"):
            tiny_config(patch=100)
        lut = tiny_config(class_idx=(0, 2), ignore_classes=(1,)).mask_lut()
        assert lut[0] == 0 and lut[2] == 1 and lut[1] == 255 and lut[7] == 255


def test_config_for_a_project_class_list_and_grid():
    classes = [ClassInfo(0, "Background", "#000000"), ClassInfo(1, "Epithelium", "#c80000"),
               ClassInfo(2, "Pen", "#0000ff", ignore=True), ClassInfo(3, "Stroma", "#00a000")]
    spec = GridSpec(patch=128, target_mpp=2.0)
    cfg = config_for(classes, spec, encoder="tu-mobilenetv3_small_050", encoder_depth=3)
    assert cfg.class_idx == (0, 1, 3) and cfg.class_names == ("Background", "Epithelium", "Stroma")
    assert cfg.ignore_classes == (2,) and cfg.decoder_channels == (256, 128, 64) and cfg.patch == 128
    assert cfg.target_mpp == 2.0 and cfg.downsample is None and cfg.grid == spec.to_dict()
    assert cfg.mask_lut()[3] == 2 and cfg.mask_lut()[2] == 255 and cfg.channel_to_class().tolist() == [0, 1, 3]
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown model config keys"):
        ModelConfig.from_dict(cfg.to_dict() | {"colour": 1})
    check_classes(cfg, classes, "m.pt")
    with pytest.raises(CheckpointError, match="m.pt: the model was trained for classes"):
        check_classes(cfg, classes[:2], "m.pt")


def test_preprocess_normalises_on_the_0_1_scale():
    cfg = tiny_config(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    x = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    assert torch.allclose(preprocess(x, cfg), torch.full((1, 3, 2, 2), 2.0))
    with pytest.raises(ValueError, match="unknown encoder"):
        build_model(tiny_config(encoder="no-such-encoder"))
