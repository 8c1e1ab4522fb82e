"""One scale from training to deployment, driven from the CLI as a user would: a grid at the default scale →
a tiny model → export → inference on a slide scanned at another µm/px; and slides without µm/px (uncalibrated)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tifffile
from conftest import run_cli, tissue_image, write_pyramid

from al_core.deploy.onnx_io import read_onnx_metadata
from al_core.wsi.grid import DEFAULT_TARGET_MPP

TINY = ["--encoder", "tu-mobilenetv3_small_050", "--encoder-depth", "3", "--decoder-channels", "32", "16", "8",
        "--epochs", "1", "--max-steps", "2", "--batch-size", "4"]


def _tiff_mpp(path: Path) -> float:
    """µm/px of a TIFF's first page from its resolution tags (centimetre units)."""
    with tifffile.TiffFile(path) as tf:
        num, den = tf.pages[0].tags["XResolution"].value
    return 1e4 / (num / den)


def _trained(root: Path, slide: Path, geojson: Path, *grid: str) -> dict:
    run_cli("init", str(root), "--classes", "Epithelium:#c80000")
    run_cli("add", str(root), str(slide))
    run_cli("grid", str(root), "--patch", "128", "--overlap", "0", *grid)
    run_cli("labels", "import", str(root), str(geojson))
    return json.loads(run_cli("train", str(root), *TINY, "--json").stdout)


@pytest.mark.slow
def test_default_grid_model_runs_at_its_training_mpp_on_another_slide(tmp_path, sample_svs, sample_geojson):
    """The issue's chain: the grid's default scale is the model's, in the checkpoint, the model row, the ONNX
    metadata and the inference report; a 0.25 µm/px slide is read 4x down to the training 1 µm/px."""
    root = tmp_path / "proj"
    res = _trained(root, sample_svs, sample_geojson)
    assert res["status"] == "done"
    assert res["scale"] == {"mpp": DEFAULT_TARGET_MPP, "downsample": None, "calibrated": True}
    status = json.loads(run_cli("status", str(root), "--json").stdout)
    assert status["grid"]["target_mpp"] == DEFAULT_TARGET_MPP  # the stored grid says its scale
    from al_core.learn.checkpoint import load_checkpoint
    from al_core.project.project import Project

    with Project.open(root) as proj:
        row = proj.models.resolve(res["model_id"])
        assert json.loads(row.config)["target_mpp"] == DEFAULT_TARGET_MPP
        assert load_checkpoint(proj.models.checkpoint(row)).config.target_mpp == DEFAULT_TARGET_MPP
    onnx = tmp_path / "model.onnx"
    out = json.loads(run_cli("export", str(root), "-o", str(onnx), "--push", "epi", "--json").stdout)
    assert out["target_mpp"] == DEFAULT_TARGET_MPP and out["uncalibrated"] is False
    props = read_onnx_metadata(onnx)
    assert json.loads(props["slideloop.target_mpp"]) == DEFAULT_TARGET_MPP
    assert json.loads(props["slideloop.downsample"]) is None

    other = write_pyramid(tmp_path / "fine.tif", tissue_image(1024, 768, seed=3), mpp=0.25)  # not the sample's 0.5
    pred = tmp_path / "pred.tiff"
    rep = json.loads(run_cli("infer", str(root / "deployed" / "epi"), str(other), "-o", str(pred), "--probabilities",
                             "--no-geojson", "--json").stdout)[0]
    assert rep["mpp"] == pytest.approx(0.25)
    assert rep["model_mpp"] == pytest.approx(DEFAULT_TARGET_MPP) and rep["downsample"] == pytest.approx(4.0)
    assert rep["model_scale"] == {"mpp": DEFAULT_TARGET_MPP, "downsample": None, "calibrated": True}
    assert rep["model_dimensions"] == [256, 192]
    # the probabilities are at model scale: their µm/px is the training µm/px
    assert _tiff_mpp(Path(rep["probabilities"])) == pytest.approx(DEFAULT_TARGET_MPP, rel=1e-3)
    with tifffile.TiffFile(pred) as tf:
        desc = json.loads(tf.pages[0].description)["slideloop"]
    assert desc["model_mpp"] == DEFAULT_TARGET_MPP and desc["model_scale"]["calibrated"] is True
    saved = json.loads(Path(rep["report"]).read_text())
    assert saved["model_scale"]["mpp"] == DEFAULT_TARGET_MPP


@pytest.mark.slow
def test_uncalibrated_slide_is_flagged_and_its_model_says_so(tmp_path, sample_geojson):
    """A slide without µm/px: added with a warning, marked uncalibrated, refused by a µm grid (hint names the
    flags), gridded at a downsample; its model is exported as uncalibrated at that downsample."""
    img = tissue_image(1536, 1536, seed=1)
    slide = write_pyramid(tmp_path / "nompp.tif", img, mpp=None, levels=2)
    root = tmp_path / "proj"
    run_cli("init", str(root), "--classes", "Epithelium:#c80000")
    added = run_cli("add", str(root), str(slide))
    assert "nompp" in added.stderr and "uncalibrated" in added.stderr
    st = json.loads(run_cli("status", str(root), "--json").stdout)["slides"][0]
    assert st["calibrated"] is False and st["mpp"] is None
    assert "uncalibrated" in run_cli("status", str(root)).stdout
    bad = run_cli("grid", str(root), "--patch", "128", check=False)
    assert bad.returncode == 2
    assert "nompp: has no µm/px metadata" in bad.stderr and "--downsample" in bad.stderr and "--mpp" in bad.stderr
    assert "Traceback" not in bad.stderr
    run_cli("grid", str(root), "--patch", "128", "--overlap", "0", "--downsample", "2", "--min-tissue", "0.1")
    # a label over the tissue ellipse (background elsewhere): two classes to train on
    geo = {"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {
        "classification": {"name": "Epithelium"}}, "geometry": {"type": "Polygon", "coordinates": [
            [[600, 600], [900, 600], [900, 900], [600, 900], [600, 600]]]}}]}
    (tmp_path / "nompp.geojson").write_text(json.dumps(geo))
    run_cli("labels", "import", str(root), str(tmp_path / "nompp.geojson"))
    res = json.loads(run_cli("train", str(root), *TINY, "--json").stdout)
    assert res["scale"] == {"mpp": None, "downsample": 2.0, "calibrated": False}
    onnx = tmp_path / "m.onnx"
    out = json.loads(run_cli("export", str(root), "-o", str(onnx), "--json").stdout)
    assert out["uncalibrated"] is True and out["downsample"] == 2.0 and out["target_mpp"] is None
    rep = json.loads(run_cli("infer", str(onnx), str(slide), "-o", str(tmp_path / "p.tiff"), "--no-geojson",
                             "--json").stdout)[0]
    assert rep["downsample"] == 2.0 and rep["model_scale"] == {"mpp": None, "downsample": 2.0, "calibrated": False}
    # the grid rebuilt at another downsample: predicting with the model would read the wrong scale, refused
    run_cli("grid", str(root), "--patch", "128", "--overlap", "0", "--downsample", "4", "--min-tissue", "0.1")
    wrong = run_cli("predict", str(root), check=False)
    assert wrong.returncode == 2 and "trained at downsample 2 (uncalibrated)" in wrong.stderr


@pytest.mark.slow
def test_export_of_a_model_without_a_recorded_scale_needs_one(tmp_path, sample_svs):
    """A model trained before scales were recorded (no µm/px, no uncalibrated flag) is refused by export unless
    its scale is given; a scale other than a known training scale is refused too."""
    import torch

    from al_core.learn.checkpoint import save_checkpoint
    from al_core.learn.model import build_model, config_for
    from al_core.project.project import Project
    from al_core.project.schema import ModelRow

    root = tmp_path / "proj"
    run_cli("init", str(root), "--classes", "Tissue:#c80000")
    run_cli("add", str(root), str(sample_svs))
    run_cli("grid", str(root), "--patch", "64", "--overlap", "16", "--mpp", "2.0")
    with Project.open(root) as proj:
        cfg = config_for(proj.classes(), proj.grid_spec(), encoder="tu-mobilenetv3_small_050", encoder_depth=3,
                         decoder_channels=(32, 16, 8))
        assert cfg.target_mpp == 2.0
        old = type(cfg).from_dict(cfg.to_dict() | {"target_mpp": None, "downsample": None})
        torch.manual_seed(0)
        save_checkpoint(root / "models" / "old.pt", build_model(old), old)
        save_checkpoint(root / "models" / "new.pt", build_model(cfg), cfg)
        with proj.store.write() as s:
            s.add(ModelRow(status="done", checkpoint="models/old.pt", config=json.dumps(old.to_dict())))
            s.add(ModelRow(status="done", checkpoint="models/new.pt", config=json.dumps(cfg.to_dict())))
    bad = run_cli("export", str(root), "--model", "1", "-o", str(tmp_path / "old.onnx"), check=False)
    assert bad.returncode == 2 and "model 1 has no recorded training scale" in bad.stderr
    assert "--mpp" in bad.stderr and not (tmp_path / "old.onnx").exists()
    out = json.loads(run_cli("export", str(root), "--model", "1", "-o", str(tmp_path / "old.onnx"), "--mpp", "2",
                             "--json").stdout)
    assert out["target_mpp"] == 2.0
    wrong = run_cli("export", str(root), "--model", "2", "-o", str(tmp_path / "w.onnx"), "--mpp", "0.5", check=False)
    assert wrong.returncode == 2 and "trained at 2 µm/px" in wrong.stderr
