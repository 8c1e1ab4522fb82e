"""The deployment view's state (``slideloop_apps.deploy_state``) without a browser: a pushed model run over a
project slide, the clear messages for models that cannot run, the run registry the tile server reads, and the
class-map tiles of a run."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from _deploy_project import TISSUE_RGB, deploy_project, finished_run
from PIL import Image
from slideloop_apps.deploy_state import STAGE_LABELS, DeployState

from al_core.errors import ProjectError
from al_core.project.project import Project
from al_core.project.runs import check_run_id, list_runs, load_run, register_run, run_dir

#: stages that do work on every run (the probability output is not asked for here)
WORKING_STAGES = ("patch_generation", "input", "inference", "stitching", "tiff_export", "geojson", "total")


@pytest.fixture(scope="module")
def project_dir(tmp_path_factory: pytest.TempPathFactory, sample_svs: Path) -> Path:
    return deploy_project(tmp_path_factory.mktemp("deploy-state"), sample_svs)


@pytest.fixture(scope="module")
def run_id(project_dir: Path) -> str:
    return finished_run(project_dir)


def test_a_run_registers_its_outputs_and_shows_them(project_dir: Path, run_id: str) -> None:
    with Project.open(project_dir) as proj:
        state = DeployState(proj)
        assert state.model_name == "tissue-finder" and state.slide_id == 1
        assert state.run_id == run_id  # the latest run of the slide is shown on opening
        result = state.result
    run = load_run(project_dir, run_id)
    assert run.model == "tissue-finder" and run.slide_id == 1 and run.info["model_version"] == "dark-1"
    assert list_runs(project_dir, 1)[0].id == run_id and list_runs(project_dir, 2) == []
    assert result["dimensions"] == [2220, 2967] and result["slide"] == "CMU-1-Small-Region"
    assert 0 < result["patches"] <= result["patches_total"]
    timings = result["timings"]
    assert set(timings) == {key for key, _ in STAGE_LABELS}
    assert all(timings[k] > 0 for k in WORKING_STAGES), timings
    assert timings["output"] >= 0 and timings["total"] >= timings["patch_generation"]
    # every pixel of the class map is counted, in the model's classes
    mw, mh = json.loads(run.file("report").read_text())["model_dimensions"]
    assert set(result["class_pixels"]) == {"Background", "Tissue"}
    assert sum(result["class_pixels"].values()) == mw * mh and result["class_pixels"]["Tissue"] > 0
    report = json.loads(run.file("report").read_text())
    assert report["patches"] == result["patches"] and report["timings"] == timings


@pytest.mark.parametrize("name, problem, named", [
    ("not-onnx", "not an ONNX model", "deployed/not-onnx/model.onnx"),        # the model file
    ("wrong-input", "has 64 height", "deployed/wrong-input/model.onnx"),
    # the model is fine; the slide is too coarse for it: the slide and both scales are named
    ("too-fine", "cannot be read at the model's scale", "CMU-1-Small-Region.svs: is scanned at 0.499 µm/px but "
                                                         "the model needs 0.1 µm/px"),
])
def test_models_that_cannot_run_say_why(project_dir: Path, name: str, problem: str, named: str) -> None:
    with Project.open(project_dir) as proj:
        state = DeployState(proj)
        state.model_name = name
        before = set((project_dir / "inference").glob("*"))
        assert state.run_now() is False
        assert state.level == "error" and state.message.startswith("The run failed: "), state.message
        assert problem in state.message and named in state.message, state.message
        assert "Traceback" not in state.message and not state.running
        assert set((project_dir / "inference").glob("*")) == before  # a failed run leaves no folder


def test_class_map_tiles_sample_the_tiff_without_inventing_classes(project_dir: Path, run_id: str) -> None:
    """At the top zoom a tile is level 0 of the class map pixel for pixel; below it, only existing classes."""
    import tiffslide

    from al_core.tiles.class_map import ClassMapTiles

    path = load_run(project_dir, run_id).file("tiff")
    tiles = ClassMapTiles(path)
    assert [c["name"] for c in tiles.classes] == ["Background", "Tissue"]
    pyr = tiles.pyramid
    x, y = 3, 5  # a full tile at the tissue's edge: both classes
    with tiffslide.TiffSlide(path) as ts:
        level0 = ts.read_region((x * 256, y * 256), 0, (256, 256), as_array=True)[..., 0]
    assert set(np.unique(level0)) == {0, 1}
    assert np.array_equal(tiles.read(pyr.zmax, x, y), level0)
    for z in range(pyr.zmax):
        assert set(np.unique(tiles.read(z, 0, 0))) <= {0, 1}
    rgba = np.asarray(Image.open(io.BytesIO(tiles.tile(pyr.zmax, x, y))))
    tissue = level0 == 1
    assert (rgba[..., 3][~tissue] == 0).all() and (rgba[..., 3][tissue] > 0).all()
    assert tuple(rgba[tissue][0, :3]) == TISSUE_RGB  # the model's own colour for its class


def test_run_registry_serves_only_files_inside_the_run(tmp_path: Path) -> None:
    for bad in ("", "../x", "a/b", ".hidden", "x" * 65, "a b"):
        with pytest.raises(ProjectError, match="not an inference run id"):
            check_run_id(bad)
    (tmp_path / "project.db").write_bytes(b"SQLite format 3\x00")
    run_dir(tmp_path, "r1").mkdir(parents=True)
    (run_dir(tmp_path, "r1") / "pred.tiff").write_bytes(b"II*\x00")
    register_run(tmp_path, "r1", {"files": {"tiff": "pred.tiff", "geojson": "../../project.db",
                                            "report": "missing.json"}})
    run = load_run(tmp_path, "r1")
    assert run.file("tiff") == (run_dir(tmp_path, "r1") / "pred.tiff").resolve()
    for kind in ("geojson", "report", "probabilities"):  # outside the folder, absent, not a served kind
        with pytest.raises(ProjectError):
            run.file(kind)
    run_dir(tmp_path, "r2").mkdir()  # no run.json yet: in progress
    with pytest.raises(ProjectError, match="no finished inference run"):
        load_run(tmp_path, "r2")
    assert [r.id for r in list_runs(tmp_path)] == ["r1"]
