"""Whole-slide inference (al_core.deploy.infer and its pieces): stitching vs a direct full-image prediction,
tissue-only patches, GeoJSON, stage timings that add up, the SHELL model through a config, and bad input.
The same runs through ``slideloop infer`` are in tests/cli/test_deploy_cmds.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
from _deploy_models import SHELL_MODEL, check_timings, darkness_metadata, darkness_reference
from conftest import write_pyramid

import al_core
from al_core.deploy.config import InferenceConfig
from al_core.deploy.infer import infer_slide
from al_core.deploy.segmenter import OnnxSegmenter, select_providers
from al_core.deploy.stitch import blend_window
from al_core.deploy.tiff_writer import pyramid_sizes
from al_core.errors import ModelConfigError, ScaleError, SlideError
from al_core.project.labels_io import read_geojson
from al_core.wsi.slides import open_slide
from al_core.wsi.tissue import compute_tissue


def test_blend_window_and_pyramid_sizes():
    w = blend_window(64, 16)
    assert w.shape == (64, 64) and w.min() > 0 and w[16:48, 16:48].min() == 1.0
    assert np.allclose(w, w[::-1]) and np.allclose(w, w.T)
    # two neighbours overlapping by 16 px: the ramps cross-fade (weights rise on one side as they fall)
    assert np.all(np.diff(w[32, :16]) > 0) and np.all(np.diff(w[32, 48:]) < 0)
    assert np.all(blend_window(32, 0) == 1.0)
    assert pyramid_sizes(2220, 2967, 512) == [(2220, 2967), (1110, 1484), (555, 742), (278, 371)]
    assert select_providers()[-1] == "CPUExecutionProvider"
    with pytest.raises(ValueError, match="not available"):
        select_providers(["NoSuchExecutionProvider"])


def test_stitching_equals_full_image_prediction_at_level0(tmp_path, dark_model, sample_svs):
    """At the slide's own resolution patches and the full image are the same pixels: blending overlapping
    patches must reproduce the one-pass prediction except where a patch border's zero padding matters."""
    cfg = tmp_path / "level0.json"
    cfg.write_text(json.dumps(darkness_metadata(input_size=256, overlap=32, target_mpp=None, downsample=1.0)))
    out = tmp_path / "l0.tiff"
    res = infer_slide(dark_model, sample_svs, out, config=cfg, min_tissue=0, probabilities=True, geojson=False,
                      batch_size=8)
    assert res.downsample == 1.0 and res.patches == res.patches_total == 10 * 14
    with open_slide(sample_svs) as s:
        ref = darkness_reference(s.read((0, 0), s.dimensions, downsample=1.0))
    cmap = tifffile.imread(out)
    assert 0.1 < cmap.mean() < 0.9
    assert (cmap == ref.argmax(0)).mean() > 0.999
    probs = tifffile.imread(out.with_name("l0.probabilities.tiff"))[..., 1] / 255.0
    assert np.abs(probs - ref[1]).max() < 0.05 and np.abs(probs - ref[1]).mean() < 0.003
    check_timings(res.timings, geojson=False)
    report = json.loads(out.with_name("l0.report.json").read_text())
    assert report["timings"] == res.timings and report["patches"] == 140 and report["levels"] == res.levels >= 3


@pytest.mark.slow
def test_tissue_only_patches_and_geojson(tmp_path, dark_model, sample_svs):
    out = tmp_path / "tissue.tiff"
    res = infer_slide(dark_model, sample_svs, out, batch_size=3)
    assert 0 < res.patches < res.patches_total
    with open_slide(sample_svs) as slide:
        tissue = compute_tissue(slide)
    cmap = tifffile.imread(out)
    assert cmap.shape == (2967, 2220)
    # no class outside the tissue mask
    rows = np.minimum((np.arange(cmap.shape[0]) / tissue.downsample).astype(int), tissue.mask.shape[0] - 1)
    cols = np.minimum((np.arange(cmap.shape[1]) / tissue.downsample).astype(int), tissue.mask.shape[1] - 1)
    outside = ~tissue.mask[rows][:, cols]
    # (a few pixels on the mask's edges may round to the other side)
    assert cmap[outside].mean() < 0.002 and cmap[~outside].mean() > 0.3
    unmasked = infer_slide(dark_model, sample_svs, tmp_path / "unmasked.tiff", mask_tissue=False, geojson=False)
    assert tifffile.imread(unmasked.output)[outside].mean() > 0.01  # the mask is what removed them
    check_timings(res.timings, geojson=True)
    gj = read_geojson(res.geojson)
    assert [s.class_name for s in gj.shapes] == ["Tissue"]
    # the polygons cover about the predicted area (level-0 pixels)
    assert gj.shapes[0].geometry.area == pytest.approx(float((cmap == 1).sum()), rel=0.1)


def test_bad_inputs(tmp_path, dark_model, unet_model, sample_svs):
    """A slide without mpp, a slide coarser than the model's scale, a config that does not fit the model."""
    png = tmp_path / "crop.png"
    with open_slide(sample_svs) as s:
        from PIL import Image

        Image.fromarray(s.read((0, 0), (256, 256), downsample=1.0)).save(png)
    with pytest.raises(SlideError, match="crop.png: has no microns-per-pixel metadata") as err:
        infer_slide(dark_model, png, tmp_path / "x.tiff")
    assert isinstance(err.value, ScaleError) and "--mpp" not in str(err.value)  # the CLI adds its hint
    fine = OnnxSegmenter(unet_model, darkness_metadata_config(target_mpp=0.25))
    with pytest.raises(SlideError, match="cannot be read at the model's scale"):
        infer_slide(fine, sample_svs, tmp_path / "y.tiff")
    three = InferenceConfig.from_dict({"input_size": 128, "classes": ["a", "b", "c"], "target_mpp": 2.0})
    with pytest.raises(ModelConfigError, match="unet.onnx: the model outputs 2 channels but the config has 3"):
        infer_slide(unet_model, sample_svs, tmp_path / "z.tiff", config=three)
    with pytest.raises(ValueError, match="must be a .tif/.tiff file"):
        infer_slide(dark_model, sample_svs, tmp_path / "c.png")
    with pytest.raises(ValueError, match="batch size must be at least 1"):
        infer_slide(dark_model, sample_svs, tmp_path / "d.tiff", batch_size=0)
    with pytest.raises(ValueError, match="belong to the OnnxSegmenter"):
        infer_slide(fine, sample_svs, tmp_path / "e.tiff", config=three)
    assert not list(tmp_path.glob("*.tif*"))


def test_infer_is_the_scripting_name_and_reports_progress(tmp_path, dark_model, sample_svs):
    seen: list[tuple[int, int]] = []
    res = al_core.infer(dark_model, sample_svs, tmp_path / "p.tiff", geojson=False, batch_size=8,
                        progress=lambda done, total: seen.append((done, total)))
    assert isinstance(res, al_core.InferenceResult) and res.geojson is None and res.probabilities is None
    assert seen and seen[-1] == (res.patches, res.patches) and [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert res.model_mpp == pytest.approx(2.0) and res.providers[-1] == "CPUExecutionProvider"
    mw, mh = res.model_dimensions  # the class map is counted at the model's scale
    assert set(res.class_pixels) == {"Background", "Tissue"} and sum(res.class_pixels.values()) == mw * mh
    check_timings(res.timings, geojson=False)


def darkness_metadata_config(**kw):
    from al_core.deploy.config import InferenceConfig

    meta = darkness_metadata(**kw)
    return InferenceConfig.from_dict(meta)


@pytest.mark.slow
@pytest.mark.skipif(not SHELL_MODEL.is_file(), reason="shared SHELL model not present")
def test_shell_model_through_config(tmp_path, sample_svs):
    """The external SHELL model (EHO input, 3 sigmoid outputs) on a crop of the sample via a JSON config."""
    with open_slide(sample_svs) as s:
        crop = s.read((700, 1000), (768, 768), downsample=1.0)
    slide = write_pyramid(tmp_path / "crop.tif", crop, mpp=0.499, levels=1)
    cfg = tmp_path / "shell.json"
    cfg.write_text(json.dumps({
        "input_size": 256, "overlap": 32, "target_mpp": 1.0, "scale": 1 / 255, "activation": "sigmoid",
        "preprocess": "macenko_eho", "output": "logits", "output_classes": [1, 2, 0],
        "classes": [{"index": 0, "name": "Background"}, {"index": 1, "name": "Epithelium"},
                    {"index": 2, "name": "Stroma"}], "model_name": "SHELL"}))
    out = tmp_path / "shell.tiff"
    res = infer_slide(SHELL_MODEL, slide, out, config=cfg, min_tissue=0, batch_size=2)
    assert res.patches == 4 and res.model_dimensions == (383, 383)
    cmap = tifffile.imread(out)
    assert cmap.shape == (768, 768) and set(np.unique(cmap)) <= {0, 1, 2}
    assert len(res.class_pixels) >= 2
