"""The scripting facade (al_core.Project): slides, grid and status, and the whole loop in a few lines."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

import al_core
from al_core import GridSpec, NoGridError, NoModelError, ProjectError

SLIDE = "CMU-1-Small-Region"


@pytest.fixture()
def project(three_class_project):
    return three_class_project


def test_grid_and_status(project, sample_geojson, sample_pyramid):
    project.add_slide(sample_pyramid, name="pyramid")
    project.import_labels(sample_geojson, slide=SLIDE)
    project.build_grid(GridSpec(patch=256))
    st = project.status()
    assert st["totals"]["slides"] == 2
    by = {s["name"]: s for s in st["slides"]}
    # same tissue at the same physical scale on both files: similar patch counts
    assert abs(by["pyramid"]["patches"] - by[SLIDE]["patches"]) <= 3
    assert 0 < by[SLIDE]["labelled"] <= by[SLIDE]["patches"]
    assert by["pyramid"]["labelled"] == 0
    for p in project.patches():
        assert p.tissue >= 0.25 and p.size == round(256 * 1.0 / 0.499) and p.patch == 256
    # a spec without a scale is stored at the default µm/px: the scale a model trains at is always known
    assert st["grid"] == GridSpec(patch=256, target_mpp=1.0).to_dict() and st["grid"]["overlap"] == 64


def test_slides_by_id_and_name(project, sample_svs):
    row = project.slide_row(SLIDE)
    assert project.slide_row(row.id).name == SLIDE and project.slide_row(row) is row
    assert [s.name for s in project.slides()] == [SLIDE]
    with pytest.raises(ProjectError, match="already in the project"):
        project.add_slide(sample_svs)
    with pytest.raises(ProjectError, match=f"no slide 'nope' in the project \\(slides: {SLIDE}\\)"):
        project.slide_row("nope")
    with project.open_slide(SLIDE) as s:
        assert s.dimensions == (2220, 2967)
    t = project.tissue(SLIDE)
    assert t.mask.dtype == bool and 0.2 < t.fraction < 0.5


def test_grid_from_keywords_and_patch_pixels(project):
    assert project.grid_id() is None and project.grid_spec() is None and project.patches() == []
    gid = project.build_grid(patch=128, overlap=0, target_mpp=2.0)
    assert project.grid_id() == gid and project.grid_spec() == GridSpec(patch=128, overlap=0, target_mpp=2.0)
    p = project.patches(SLIDE)[0]
    got = project.patch(p.id)
    assert (got.id, got.x, got.y, got.size, got.grid_id) == (p.id, p.x, p.y, p.size, gid)
    with project.open_slide(SLIDE) as s:
        want = s.read((p.x, p.y), (128, 128), downsample=p.downsample)
        assert np.array_equal(project.read_patch(p, s), want)
    assert np.array_equal(project.read_patch(p), want)
    with pytest.raises(ProjectError, match="no patch 99999"):
        project.patch(99999)


def test_export_labels_needs_a_slide_when_there_are_several(project, sample_pyramid, tmp_path):
    project.add_slide(sample_pyramid, name="pyr")
    with pytest.raises(ProjectError, match="several slides"):
        project.export_labels(tmp_path / "x.geojson")
    assert project.export_labels(tmp_path / "x.geojson", slide="pyr") == 0
    assert json.loads((tmp_path / "x.geojson").read_text())["features"] == []


def test_the_loop_before_its_steps_are_clear_errors(project):
    with pytest.raises(NoModelError, match="no trained model yet"):
        project.predict()
    with pytest.raises(NoGridError, match="no patch grid yet"):
        project.train(epochs=1)
    assert project.deployed() == []


@pytest.mark.slow
def test_scripting_the_whole_loop(tmp_path, sample_svs, sample_geojson):
    """The issue's notebook script: create → slide → grid → labels → train → predict → queue → export → infer."""
    p = al_core.Project.create(tmp_path / "p1", ["Epithelium:#c80000"])
    p.add_slide(sample_svs)
    p.build_grid(al_core.GridSpec(patch=128))  # overlap: a quarter of the patch
    p.import_labels(sample_geojson)
    res = p.train(epochs=1, max_steps=2, encoder="tu-mobilenetv3_small_050", encoder_depth=3,
                  decoder_channels=(16, 8, 4))
    pred = p.predict()
    queue = p.review_queue()
    out = p.export(tmp_path / "m.onnx", push="epi-v1")
    run = al_core.infer(out.path, sample_svs, tmp_path / "pred.tiff")
    p.close()

    assert isinstance(res, al_core.TrainResult) and res.status == "done" and res.model_id == 1
    assert res.history[-1]["steps"] == 2 and res.checkpoint.is_file()
    assert p.grid_spec().overlap == 32
    assert isinstance(pred, al_core.PredictResult) and pred.model_id == 1
    assert pred.patches == len(p.patches()) and 0 < pred.labelled <= pred.patches
    assert len(queue) == int(np.ceil(0.05 * pred.labelled)) and queue["iou"].is_monotonic_increasing
    assert queue.attrs["model_id"] == 1 and queue["labelled"].all()
    assert out.model_id == 1 and out.path.is_file() and out.parity is not None and out.parity.ok
    assert [c.name for c in out.config.classes] == ["Background", "Epithelium"]
    assert out.config.input_size == (128, 128) and out.config.overlap == 32
    assert out.deployed is not None and [m.name for m in p.deployed()] == ["epi-v1"]
    # the deployed model runs at the scale it was trained at (the grid's 1 µm/px)
    assert isinstance(run, al_core.InferenceResult) and run.model_mpp == pytest.approx(1.0)
    assert run.dimensions == (2220, 2967) and run.downsample == pytest.approx(1.0 / 0.499)
    cmap = tifffile.imread(tmp_path / "pred.tiff")
    assert cmap.shape == (2967, 2220) and set(np.unique(cmap)) <= {0, 1}
    assert json.loads((tmp_path / "pred.report.json").read_text())["patches"] == run.patches > 0
