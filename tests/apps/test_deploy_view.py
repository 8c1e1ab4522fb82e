"""The deployment view as a user runs it: a real ``jupyter server`` with Voilà and the tile server, a tiny ONNX
model pushed into a project, headless Chromium picking the model and slide, running, and looking at the
result. (The state without a browser: test_deploy_state.py; the inference routes: test_server_ext.py.)"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from _browser import AppServer, app_server, browser_page, outside_requests, save_screenshot
from _deploy_project import deploy_project
from PIL import Image

from al_core.project.runs import list_runs

pytestmark = pytest.mark.slow
TIMEOUT = 90_000  # ms; a cold kernel on two shared cores
#: stages that do work on every run (the probability output is not asked for here)
WORKING_STAGES = ("patch_generation", "input", "inference", "stitching", "tiff_export", "geojson", "total")


@pytest.fixture(scope="module")
def project_dir(tmp_path_factory: pytest.TempPathFactory, sample_svs: Path) -> Path:
    return deploy_project(tmp_path_factory.mktemp("deploy"), sample_svs)


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
        assert report["patches"] == int(m[1]) and report["patches"] <= report["patches_total"]
        assert report["dimensions"] == [2220, 2967]
        assert all(report["timings"][k] > 0 for k in WORKING_STAGES), report["timings"]
        assert report["timings"]["total"] >= report["timings"]["patch_generation"]
        assert sum(report["class_pixels"].values()) == int(np.prod(report["model_dimensions"]))
        assert report["class_pixels"]["Tissue"] > 0
        assert [r.info["patches"] for r in list_runs(project_dir)] == [report["patches"]]

        # --- an upload adds a slide to the project and shows it -----------------------------------------
        png = tmp_path / "crop region.png"
        status, body, _ = server.get("slideloop/tiles/1/3/2/3.jpeg")
        assert status == 200
        Image.open(io.BytesIO(body)).save(png)
        # its label ("Upload slide (0)") shows whole, not cut to "Uploa…"
        fit = page.eval_on_selector(".slideloop-upload", "e => [e.scrollWidth, e.clientWidth, e.innerText]")
        assert fit[0] <= fit[1], fit
        with page.expect_file_chooser() as chooser:  # the widget's <input type=file> is not in the DOM
            page.click(".slideloop-upload")
        chooser.value.set_files(str(png))
        page.wait_for_function("() => document.querySelector('.slideloop-message').innerText.includes('Added slide')",
                               timeout=TIMEOUT)
        # a slide without µm/px is labelled so in the picker
        assert page.locator(".slideloop-deploy-slide select").input_value() == "crop_region (uncalibrated)"
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
        assert server.app_tracebacks() == []
