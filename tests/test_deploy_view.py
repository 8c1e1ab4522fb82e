"""The deployment view as a user runs it: a real ``jupyter server`` with Voilà and the tile server, a tiny ONNX
model pushed into a project, headless Chromium picking the model and slide, running, and looking at the
result; plus the inference routes' authentication and 404s, and the clear messages for models that cannot run."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from _browser import AppServer, app_server, browser_page, outside_requests, save_screenshot
from _deploy_models import Darkness, darkness_metadata
from PIL import Image
from slideloop_apps.deploy_state import DeployState
from slideloop_apps.runs import list_runs

from al_core.export import build_metadata, export_onnx, push_model
from al_core.model_config import InferenceConfig
from al_core.project import Project

pytestmark = pytest.mark.slow
TIMEOUT = 90_000  # ms; a cold kernel on two shared cores
#: the tissue class in a colour that reads apart from H&E pink and purple
TISSUE_CLASSES = [{"index": 0, "name": "Background", "color": "#000000"},
                  {"index": 1, "name": "Tissue", "color": "#00c8ff"}]


def _fixed_onnx(path: Path, size: int, meta: dict[str, str]) -> None:
    """A model with a fixed 1 x 3 x size x size input, carrying slideloop metadata that may not fit it."""
    import onnx
    from onnx import TensorProto, helper

    w = helper.make_tensor("w", TensorProto.FLOAT, [2, 3, 1, 1], [0.1] * 6)
    graph = helper.make_graph([helper.make_node("Conv", ["input", "w"], ["out"])], "g",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, size, size])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 2, size, size])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    helper.set_model_props(model, meta)
    onnx.save(model, str(path))


@pytest.fixture(scope="module")
def project_dir(tmp_path_factory: pytest.TempPathFactory, sample_svs: Path) -> Path:
    """The sample slide and four pushed models: a working one, one too fine for the slide, one whose input
    does not fit its settings, and a 'model' that is not ONNX."""
    d = tmp_path_factory.mktemp("deploy")
    with Project.create(d / "proj") as proj:
        proj.add_slide(sample_svs)
    root = (d / "proj").resolve()
    export_onnx(Darkness(), d / "tissue-finder.onnx", darkness_metadata(classes=TISSUE_CLASSES))
    export_onnx(Darkness(), d / "too-fine.onnx", darkness_metadata(target_mpp=0.1))
    _fixed_onnx(d / "wrong-input.onnx", 64, build_metadata(InferenceConfig.from_dict(darkness_metadata())))
    for name in ("too-fine", "wrong-input", "tissue-finder"):  # pushed last = listed first
        push_model(root, d / f"{name}.onnx")
    broken = root / "deployed" / "not-onnx"
    broken.mkdir()
    (broken / "model.onnx").write_bytes(b"this is not a model\n")
    (broken / "model.json").write_text(json.dumps({"name": "not-onnx", "pushed_at": "2000-01-01T00:00:00+00:00",
                                                   "config": None}))
    return root


@pytest.fixture(scope="module")
def server(project_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppServer]:
    with app_server(project_dir, tmp_path_factory.mktemp("srv")) as srv:
        yield srv


def _message(page) -> str:
    return page.inner_text(".slideloop-message")


def test_deployment_view_runs_a_pushed_model_and_shows_the_overlay(server: AppServer, project_dir: Path,
                                                                    tmp_path: Path) -> None:
    with browser_page() as (page, requests):
        page.goto(f"{server.url}voila/render/deploy.ipynb?token={server.token}")
        page.wait_for_selector(".slideloop-map img.leaflet-tile-loaded[src*='/slideloop/tiles/1/']", timeout=TIMEOUT)
        assert "No result for this slide yet" in page.inner_text(".slideloop-timings")

        # --- a model the slide cannot be read for: a clear message, nothing registered -----------------
        page.locator(".slideloop-deploy-model select").select_option(label="too-fine · version dark-1")
        page.click("button.slideloop-run")
        page.wait_for_function("() => document.querySelector('.slideloop-message').innerText.includes('failed')",
                               timeout=TIMEOUT)
        assert "cannot be read at the model's scale" in _message(page)
        assert list_runs(project_dir) == []

        # --- the real run: progress per patch, then the result over the slide ---------------------------
        page.locator(".slideloop-deploy-model select").select_option(label="tissue-finder · version dark-1")
        page.locator(".slideloop-deploy-slide select").select_option(label="CMU-1-Small-Region")
        assert "Tissue" in page.inner_text(".slideloop-model-note")
        page.click("button.slideloop-run")
        page.wait_for_function("() => document.querySelector('.slideloop-message').innerText.includes('Done:')",
                               timeout=TIMEOUT)
        page.wait_for_selector(".slideloop-map img.leaflet-tile-loaded[src*='/slideloop/inference/']", timeout=TIMEOUT)
        page.wait_for_timeout(1500)  # the rest of the visible tiles, for the screenshot
        shot = save_screenshot(page, tmp_path, "deploy-1-result")

        progress = page.inner_text(".slideloop-progress-text")
        m = re.search(r"(\d+) / (\d+) patches", progress)
        assert m and m[1] == m[2] and int(m[1]) > 0, progress
        table = page.inner_text(".slideloop-timings")
        for stage in ("Patch generation", "Inference", "Stitching", "TIFF export", "Total"):
            assert stage in table
        assert "Tissue:" in table and "mm²" in table
        assert page.locator(".slideloop-map .leaflet-control-container").inner_text().count("Tissue") == 1

        # the overlay tiles the page loaded have coloured, non-transparent pixels
        srcs = page.eval_on_selector_all(".slideloop-map img.leaflet-tile-loaded[src*='/slideloop/inference/']",
                                         "els => els.map(e => e.src)")
        alphas = []
        for src in srcs:
            resp = page.request.get(src)  # with the page's login cookie, as the <img> fetched it
            assert resp.status == 200 and resp.headers["content-type"] == "image/png"
            im = Image.open(io.BytesIO(resp.body()))
            assert im.mode == "RGBA"
            alphas.append(np.asarray(im)[..., 3])
        assert max(int((a > 0).sum()) for a in alphas) > 1000
        # and they show on screen: cyan-ish pixels over the map where there is tissue
        box = page.locator(".slideloop-map").bounding_box()
        assert box is not None
        rgb = np.asarray(Image.open(shot).convert("RGB").crop(
            (int(box["x"]), int(box["y"]), int(box["x"] + box["width"]), int(box["y"] + box["height"]))), dtype=int)
        assert ((rgb[..., 2] - rgb[..., 0]) > 60).sum() > 500

        # --- the download links return the class map and the polygons ----------------------------------
        links = {k: page.eval_on_selector(f"a.slideloop-download-{k}", "a => a.href")  # absolute URL
                 for k in ("tiff", "geojson", "report")}
        tiff = page.request.get(links["tiff"])
        assert tiff.status == 200 and tiff.headers["content-type"] == "image/tiff"
        assert "attachment" in tiff.headers["content-disposition"]
        (tmp_path / "dl.tiff").write_bytes(tiff.body())
        import tiffslide

        with tiffslide.TiffSlide(tmp_path / "dl.tiff") as ts:
            assert ts.dimensions == (2220, 2967) and ts.level_count >= 3
            assert set(np.unique(ts.read_region((0, 0), ts.level_count - 1, ts.level_dimensions[-1],
                                                as_array=True))) <= {0, 1}
        gj = json.loads(page.request.get(links["geojson"]).body())
        assert gj["type"] == "FeatureCollection" and gj["features"]
        report = json.loads(page.request.get(links["report"]).body())
        assert set(report["timings"]) >= {"inference", "total"}

        # --- an upload adds a slide to the project and shows it -----------------------------------------
        png = tmp_path / "crop region.png"
        status, body, _ = server.get("slideloop/tiles/1/3/2/3.jpeg")
        assert status == 200
        Image.open(io.BytesIO(body)).save(png)
        with page.expect_file_chooser() as chooser:  # the widget's <input type=file> is not in the DOM
            page.click(".slideloop-upload")
        chooser.value.set_files(str(png))
        page.wait_for_function("() => document.querySelector('.slideloop-message').innerText.includes('Added slide')",
                               timeout=TIMEOUT)
        assert page.locator(".slideloop-deploy-slide select").input_value() == "crop_region"
        assert "No result for this slide yet" in page.inner_text(".slideloop-timings")
        # a slide without µm/px: the model's scale cannot be found, and the view says so
        page.click("button.slideloop-run")
        page.wait_for_function("() => document.querySelector('.slideloop-message').innerText.includes('failed')",
                               timeout=TIMEOUT)
        assert "microns-per-pixel" in _message(page) and "slideloop add PROJECT FILE --mpp" in _message(page)
        page.wait_for_selector(".slideloop-map img.leaflet-tile-loaded[src*='/slideloop/tiles/2/']", timeout=TIMEOUT)
        save_screenshot(page, tmp_path, "deploy-2-upload-no-mpp")

        # --- back to the first slide: its result is listed and shown again ------------------------------
        page.locator(".slideloop-deploy-slide select").select_option(label="CMU-1-Small-Region")
        page.wait_for_selector(".slideloop-map img.leaflet-tile-loaded[src*='/slideloop/inference/']", timeout=TIMEOUT)
        # zoomed in to level 0: the class map's outlines follow the tissue pixel for pixel
        for _ in range(4):
            page.click(".slideloop-map .leaflet-control-zoom-in")
            page.wait_for_timeout(300)
        page.wait_for_selector(".slideloop-map img.leaflet-tile-loaded[src*='/slideloop/inference/'][src*='/4/']",
                               timeout=TIMEOUT)
        page.wait_for_timeout(1500)
        save_screenshot(page, tmp_path, "deploy-3-zoomed")

        assert outside_requests(requests) == []
        assert "Traceback" not in server.log_text()


@pytest.mark.parametrize("name, message", [
    ("not-onnx", "not an ONNX model"),
    ("wrong-input", "has 64 height"),
    ("too-fine", "cannot be read at the model's scale"),
])
def test_models_that_cannot_run_say_why(project_dir: Path, name: str, message: str) -> None:
    with Project.open(project_dir) as proj:
        state = DeployState(proj)
        state.model_name = name
        before = set((project_dir / "inference").glob("*"))
        assert state.run_now() is False
        assert state.level == "error" and message in state.message, state.message
        assert name in state.message or name == "too-fine"  # the model file is named
        assert not state.running
        assert set((project_dir / "inference").glob("*")) == before  # a failed run leaves no folder


# --- the inference routes behind Jupyter's authentication ------------------------------------------


@pytest.fixture(scope="module")
def run_id(project_dir: Path) -> str:
    with Project.open(project_dir) as proj:
        state = DeployState(proj)
        state.model_name = "tissue-finder"
        assert state.run_now(), state.message
        return state.run_id


def test_inference_tile_and_files(server: AppServer, run_id: str) -> None:
    status, body, headers = server.get(f"slideloop/inference/{run_id}/2/1/1.png")
    assert status == 200 and headers["Content-Type"] == "image/png" and "immutable" in headers["Cache-Control"]
    im = Image.open(io.BytesIO(body))
    assert im.mode == "RGBA" and im.size == (256, 256) and im.getextrema()[3][1] == 255
    status, body, headers = server.get(f"slideloop/inference/{run_id}/files/geojson")
    assert status == 200 and json.loads(body)["type"] == "FeatureCollection"
    assert headers["Content-Disposition"] == 'attachment; filename="CMU-1-Small-Region.geojson"'


@pytest.mark.parametrize("suffix", ["2/1/1.png", "files/tiff", "files/geojson"])
def test_inference_routes_refuse_without_credentials(server: AppServer, run_id: str, suffix: str) -> None:
    status, body, headers = server.get(f"slideloop/inference/{run_id}/{suffix}", token=False)
    assert status == 302 and "/login" in headers["Location"]
    assert b"PNG" not in body[:8] and not body.startswith(b"II*") and b"Feature" not in body


@pytest.mark.parametrize("path", [
    "slideloop/inference/20000101-000000-abcdef/0/0/0.png",   # unknown run id
    "slideloop/inference/20000101-000000-abcdef/files/tiff",
    "slideloop/inference/{run}/9/0/0.png",                     # above the top zoom
    "slideloop/inference/{run}/0/3/0.png",                     # outside the map
    "slideloop/inference/{run}/a/0/0.png",                     # not a tile index
    "slideloop/inference/{run}/files/probabilities",           # not a served kind
    "slideloop/inference/{run}/files/run.json",
    "slideloop/inference/..%2F..%2Fproject.db/files/tiff",     # paths never work as ids
    "slideloop/inference/..%2Fdeployed%2Ftissue-finder/files/tiff",
    "slideloop/inference/%2Fetc%2Fpasswd/0/0/0.png",
    "slideloop/inference/in-progress/files/tiff",              # a folder without run.json
])
def test_inference_not_found(server: AppServer, project_dir: Path, run_id: str, path: str) -> None:
    (project_dir / "inference" / "in-progress").mkdir(exist_ok=True)
    (project_dir / "inference" / "in-progress" / "x.tiff").write_bytes(b"II*\x00")
    status, body, _ = server.get(path.format(run=run_id))
    assert status == 404, body[:200]
    assert b"root:" not in body and b"SQLite" not in body and b"II*" not in body[:4]


def test_class_map_tiles_sample_the_tiff_without_inventing_classes(project_dir: Path, run_id: str) -> None:
    """At the top zoom a tile is level 0 of the class map pixel for pixel; below it, only existing classes."""
    import tiffslide

    from al_core.tiles import ClassMapTiles

    path = next((project_dir / "inference" / run_id).glob("*.tiff"))
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
    assert tuple(rgba[tissue][0, :3]) == (0, 200, 255)  # the model's own colour for its class


def test_app_command_opens_the_deployment_view(project_dir: Path) -> None:
    from al_core.cli.app_cmds import app_notebook_dir, server_command

    cmd = " ".join(server_command(project_dir, 9999, "localhost", open_browser=False, view="deploy"))
    assert "--ServerApp.default_url=/voila/render/deploy.ipynb" in cmd
    assert (app_notebook_dir() / "deploy.ipynb").is_file()


def test_run_registry_serves_only_files_inside_the_run(tmp_path: Path) -> None:
    from slideloop_apps.runs import check_run_id, load_run, register_run, run_dir

    from al_core.errors import ProjectError

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
