"""Whole-slide inference: stitching vs a direct full-image prediction, the pyramidal TIFF as readers see
it, tissue-only patches, GeoJSON, many slides on Dask, the SHELL model through a config, and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
import tiffslide
from _deploy_models import (
    SHELL_MODEL,
    Darkness,
    darkness_metadata,
    darkness_reference,
    tiny_unet,
    unet_metadata,
)
from conftest import run_cli, write_pyramid

from al_core.errors import SlideError
from al_core.export import export_onnx
from al_core.infer import OnnxSegmenter, blend_window, infer_slide, pyramid_sizes, select_providers
from al_core.labels import read_geojson
from al_core.slides import open_slide
from al_core.stain import MacenkoEHO, get_preprocessor
from al_core.tissue import compute_tissue


@pytest.fixture(scope="module")
def dark_model(tmp_path_factory):
    p = tmp_path_factory.mktemp("dark") / "dark.onnx"
    export_onnx(Darkness(), p, darkness_metadata())
    return p


@pytest.fixture(scope="module")
def unet_model(tmp_path_factory):
    p = tmp_path_factory.mktemp("unet") / "unet.onnx"
    export_onnx(tiny_unet(), p, unet_metadata())
    return p


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
    for stage in ("patch_generation", "input", "inference", "output", "stitching", "tiff_export", "total"):
        assert report["timings"][stage] >= 0
    assert report["config"]["model_version"] == "dark-1"


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
    gj = read_geojson(res.geojson)
    assert [s.class_name for s in gj.shapes] == ["Tissue"]
    # the polygons cover about the predicted area (level-0 pixels)
    assert gj.shapes[0].geometry.area == pytest.approx(float((cmap == 1).sum()), rel=0.1)


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


def test_bad_inputs(tmp_path, dark_model, unet_model, sample_svs):
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
    assert not list(tmp_path.glob("*.tif*"))
    # a slide without mpp, and a slide coarser than the model's scale
    png = tmp_path / "crop.png"
    with open_slide(sample_svs) as s:
        from PIL import Image

        Image.fromarray(s.read((0, 0), (256, 256), downsample=1.0)).save(png)
    with pytest.raises(SlideError, match="crop.png: has no microns-per-pixel metadata"):
        infer_slide(dark_model, png, tmp_path / "x.tiff")
    fine = OnnxSegmenter(unet_model, darkness_metadata_config(target_mpp=0.25))
    with pytest.raises(SlideError, match="cannot be read at the model's scale"):
        infer_slide(fine, sample_svs, tmp_path / "y.tiff")
    # a config that does not fit the model's outputs
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"input_size": 128, "classes": ["a", "b", "c"], "target_mpp": 2.0}))
    proc = run_cli("infer", str(unet_model), str(sample_svs), "-o", str(tmp_path / "z.tiff"), "--config", str(cfg),
                   check=False)
    assert proc.returncode != 0 and "unet.onnx: the model outputs 2 channels but the config has 3" in proc.stderr


def darkness_metadata_config(**kw):
    from al_core.model_config import InferenceConfig

    meta = darkness_metadata(**kw)
    return InferenceConfig.from_dict(meta)


def test_macenko_eho_preprocessing(sample_svs):
    with open_slide(sample_svs) as s:
        tissue = compute_tissue(s)
        rgb = s.read((0, 0), (555, 742), downsample=4.0)
    import cv2

    bg = cv2.resize(tissue.mask.astype(np.uint8), (555, 742), interpolation=cv2.INTER_NEAREST) == 0
    pre = get_preprocessor("macenko_eho")
    with pytest.raises(ValueError, match="before fit"):
        pre(rgb[None])
    pre.fit(rgb, bg)
    eho = pre(rgb[None])[0]
    assert eho.dtype == np.float32 and eho.min() >= 0 and eho.max() <= 255
    # stain and density are high on tissue and near zero on glass
    assert (eho[~bg].mean(0) > 3 * eho[bg].mean(0) + 10).all()
    with pytest.raises(ValueError, match="too little tissue"):
        MacenkoEHO().fit(np.full((64, 64, 3), 245, np.uint8))
    with pytest.raises(ValueError, match="unknown preprocessing step 'nope'"):
        get_preprocessor("nope")


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
