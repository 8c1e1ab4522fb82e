"""The deployment commands as a user runs them (subprocesses): export, push, deployed, infer (one slide, many on
Dask), and their one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
import tiffslide
import torch
from _deploy_models import check_timings, darkness_reference
from conftest import run_cli

from al_core.deploy.onnx_io import read_onnx_metadata
from al_core.project.project import Project
from al_core.wsi.slides import open_slide


@pytest.mark.slow
def test_cli_export_push_infer_from_project(tmp_path, sample_svs):
    """A project with a trained model version (its checkpoint written directly) → export → push → infer."""
    from al_core.learn.checkpoint import save_checkpoint
    from al_core.learn.model import build_model, config_for
    from al_core.project.schema import ModelRow

    root = tmp_path / "proj"
    run_cli("init", str(root), "--classes", "Tissue:#c80000")
    run_cli("add", str(root), str(sample_svs))
    run_cli("grid", str(root), "--patch", "64", "--overlap", "16", "--target-mpp", "2.0")
    with Project.open(root) as proj:
        cfg = config_for(proj.classes(), proj.grid_spec(), encoder="tu-mobilenetv3_small_050", encoder_depth=3,
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

@pytest.mark.slow
def test_cli_matches_direct_full_image_prediction(tmp_path, dark_model, sample_pyramid):
    out = tmp_path / "pred.tiff"
    res = json.loads(run_cli("infer", str(dark_model), str(sample_pyramid), "-o", str(out), "--min-tissue", "0",
                             "--probabilities", "--compression", "zstd", "--json").stdout)[0]
    assert res["patches"] == res["patches_total"] > 1

    # the TIFF as OpenSlide-style readers see it: slide geometry, mpp, several levels
    with open_slide(sample_pyramid) as slide:
        W, H = slide.dimensions
        ds = 2.0 / slide.mpp
        mw, mh = round(W / ds), round(H / ds)
        rgb = slide.read((0, 0), (mw, mh), downsample=ds)
    ts = tiffslide.TiffSlide(out)
    assert ts.level_count >= 3 and ts.dimensions == (W, H)
    assert float(ts.properties["tiffslide.mpp-x"]) == pytest.approx(0.499, abs=1e-4)
    assert ts.level_downsamples[1] == pytest.approx(2.0, rel=0.01)
    level0 = np.asarray(ts.read_region((0, 0), 0, (W, H), as_array=True))[..., 0]
    ts.close()

    # direct prediction of the whole image in one pass, mapped to level 0 the same way (nearest)
    ref = darkness_reference(rgb)
    expected = ref.argmax(0).astype(np.uint8)
    assert 0.1 < expected.mean() < 0.9  # both classes present: the comparison means something
    rows = np.minimum(((np.arange(H) + 0.5) / ds).astype(int), mh - 1)
    cols = np.minimum(((np.arange(W) + 0.5) / ds).astype(int), mw - 1)
    agree = (level0 == expected[rows][:, cols]).mean()
    # patches are read level-aligned, the full image is resized in one go: sub-pixel shifts flip a few
    # near-threshold pixels (the exact comparison is the next test)
    assert agree > 0.98

    with tifffile.TiffFile(out.with_name("pred.probabilities.tiff")) as tf:
        probs = tf.series[0].levels[0].asarray()
    assert probs.shape == (mh, mw, 2)
    assert np.abs(probs[..., 1] / 255.0 - ref[1]).mean() < 0.03

    report = json.loads(out.with_name("pred.report.json").read_text())
    # stages that did work took time and add up (core/deploy/test_infer.py's check_timings says how)
    check_timings(report["timings"], geojson=True)
    assert report["timings"] == res["timings"] and out.with_suffix(".geojson").is_file()
    assert report["config"]["model_version"] == "dark-1"

@pytest.mark.slow
def test_many_slides_on_dask(tmp_path, unet_model, sample_svs, sample_pyramid):
    out = tmp_path / "many"
    proc = run_cli("infer", str(unet_model), str(sample_svs), str(sample_pyramid), "-o", str(out), "--json")
    results = json.loads(proc.stdout)
    assert [r["output"] for r in results] == [str(out / "CMU-1-Small-Region.tiff"),
                                              str(out / "CMU-1-Small-Region.pyramid.tiff")]
    for r in results:
        ts = tiffslide.TiffSlide(r["output"])
        assert ts.dimensions == (2220, 2967) and ts.level_count == r["levels"] >= 3
        ts.close()

def test_bad_inputs_are_one_line_errors(tmp_path, dark_model, unet_model, sample_svs):
    cases = [
        (["infer", str(sample_svs), str(sample_svs), "-o", str(tmp_path / "a.tiff")],
         "CMU-1-Small-Region.svs: not an ONNX model"),
        (["infer", str(dark_model), str(tmp_path / "missing.svs"), "-o", str(tmp_path / "b.tiff")],
         "missing.svs: file not found"),
        (["infer", str(dark_model), str(sample_svs), "-o", str(tmp_path / "c.png")], "must be a .tif/.tiff"),
        (["infer", str(dark_model), str(sample_svs), str(sample_svs), "-o", str(tmp_path / "d.tiff")],
         "names a folder"),
    ]
    for args, message in cases:
        proc = run_cli(*args, check=False)
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.glob("*.tif*"))
    # a config that does not fit the model's outputs
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"input_size": 128, "classes": ["a", "b", "c"], "target_mpp": 2.0}))
    proc = run_cli("infer", str(unet_model), str(sample_svs), "-o", str(tmp_path / "z.tiff"), "--config", str(cfg),
                   check=False)
    assert proc.returncode != 0 and "unet.onnx: the model outputs 2 channels but the config has 3" in proc.stderr
    # a slide without mpp: the core says what is missing, the CLI adds which flag gives it
    png = tmp_path / "crop.png"
    with open_slide(sample_svs) as s:
        from PIL import Image

        Image.fromarray(s.read((0, 0), (256, 256), downsample=1.0)).save(png)
    proc = run_cli("infer", str(dark_model), str(png), "-o", str(tmp_path / "x.tiff"), check=False)
    assert proc.returncode == 2 and "crop.png: has no microns-per-pixel metadata" in proc.stderr
    assert "(give the slide's µm per pixel with --mpp" in proc.stderr
    res = json.loads(run_cli("infer", str(dark_model), str(png), "-o", str(tmp_path / "x.tiff"), "--mpp", "0.5",
                             "--no-geojson", "--json").stdout)[0]
    assert res["mpp"] == 0.5 and res["dimensions"] == [256, 256]


def test_push_and_deployed_commands(tmp_path, unet_model):
    root = tmp_path / "proj"
    run_cli("init", str(root))
    assert "no deployed models" in run_cli("deployed", str(root)).stdout
    pushed = json.loads(run_cli("push", str(root), str(unet_model), "--name", "u1", "--json").stdout)
    assert pushed["name"] == "u1" and pushed["config"]["model_version"] == "7"
    again = run_cli("push", str(root), str(unet_model), "--name", "u1", check=False)
    assert again.returncode == 2 and "already deployed" in again.stderr
    run_cli("push", str(root), str(unet_model), "--name", "u1", "--overwrite")
    listed = json.loads(run_cli("deployed", str(root), "--json").stdout)
    assert [m["name"] for m in listed] == ["u1"] and listed[0]["classes"] == "Background, Tumour"
    assert "u1" in run_cli("deployed", str(root)).stdout
