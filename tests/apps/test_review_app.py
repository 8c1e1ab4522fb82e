"""The review app as a reviewer uses it: a real ``jupyter server`` with Voilà and the tile server, driven by
headless Chromium. One session walks through the whole job, because each page load starts a kernel (~15 s)."""

from __future__ import annotations

import io
import re
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
from _browser import app_server, browser_page, image_stats, outside_requests, save_screenshot
from PIL import Image
from slideloop_apps.state import AppState
from sqlalchemy import select

from al_core.project.project import Project
from al_core.project.schema import ReviewRow
from al_core.wsi.grid import GridSpec

pytestmark = pytest.mark.slow
TIMEOUT = 90_000  # ms; a cold kernel on two shared cores


@pytest.fixture(scope="module")
def project_dir(tmp_path_factory: pytest.TempPathFactory, sample_svs: Path, sample_pyramid: Path,
                sample_geojson: Path) -> Path:
    """The sample with its pre-annotation, plus a second slide whose file is deleted after registration."""
    d = tmp_path_factory.mktemp("review")
    svs = shutil.copy(sample_svs, d / sample_svs.name)
    gone = shutil.copy(sample_pyramid, d / "moved-away.tif")
    with Project.create(d / "proj") as proj:
        proj.add_slide(svs)
        proj.add_slide(gone)
        proj.build_grid(GridSpec(patch=256))
        proj.import_labels(sample_geojson, slide="CMU-1-Small-Region")
    Path(gone).unlink()
    return (d / "proj").resolve()


def _least_labelled_row(project_dir: Path) -> tuple[int, int]:
    """(queue row, patch id) of the first-slide patch whose centre is least labelled: painting it must show."""
    with Project.open(project_dir) as proj:
        state = AppState(proj)
        best = None
        for i, q in enumerate(state.queue):
            if q.slide_id != 1:
                continue
            mask = proj.label_mask(proj.patch(q.patch_id))
            h, w = mask.shape
            frac = float((mask[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] > 0).mean())
            if best is None or frac < best[0]:
                best = (frac, i, q.patch_id)
        assert best is not None
        return best[1], best[2]


def _tile_srcs(page, kind: str) -> list[str]:
    return page.eval_on_selector_all(
        f".slideloop-map img.leaflet-tile-loaded[src*='/slideloop/{kind}/']", "els => els.map(e => e.src)")


def _tile_key(src: str) -> str:
    return re.sub(r"\?.*$", "", urlsplit(src).path)


def _message(page) -> str:
    return page.inner_text(".slideloop-message")


def test_review_session(project_dir: Path, tmp_path: Path) -> None:
    row, patch_id = _least_labelled_row(project_dir)
    with app_server(project_dir, tmp_path) as srv, browser_page() as (page, requests):
        page.goto(srv.app_url())

        # --- the map shows real tiles -----------------------------------------------------------------
        page.wait_for_selector(".slideloop-map img.leaflet-tile-loaded[src*='/slideloop/tiles/']", timeout=TIMEOUT)
        page.wait_for_timeout(1500)  # let the rest of the visible tiles arrive for the screenshot
        shot = save_screenshot(page, tmp_path, "review-1-opened")
        slide_srcs = _tile_srcs(page, "tiles")
        assert slide_srcs and all("/slideloop/tiles/1/" in s for s in slide_srcs)
        status, body, _ = srv.get(_tile_key(slide_srcs[0]).removeprefix("/"))
        assert status == 200 and image_stats(body)[1] > 5
        box = page.locator(".slideloop-map").bounding_box()
        assert box is not None
        painted = Image.open(shot).convert("L").crop((int(box["x"]), int(box["y"]), int(box["x"] + box["width"]),
                                                      int(box["y"] + box["height"])))
        assert np.asarray(painted, dtype=np.float32).std() > 10  # tissue on screen, not a blank map
        assert "No model is trained yet" in page.inner_text(".slideloop-model")
        assert page.locator(".slideloop-map .leaflet-control-container").inner_text().count("Epithelium") == 1
        zooms_before = {s.split("/slideloop/tiles/1/")[1].split("/")[0] for s in slide_srcs}

        # --- picking a queue row flies the map there and outlines the patch ------------------------------
        page.locator(".slideloop-queue select").select_option(index=row)
        page.wait_for_function(
            "z => Array.from(document.querySelectorAll(\".slideloop-map img.leaflet-tile-loaded[src*='/slideloop/tiles/1/']\"))"
            ".some(e => !z.includes(e.src.split('/slideloop/tiles/1/')[1].split('/')[0]))",
            arg=sorted(zooms_before), timeout=TIMEOUT)
        page.wait_for_selector(".slideloop-map path[stroke='#ffd400']", timeout=TIMEOUT)
        page.wait_for_timeout(1500)
        save_screenshot(page, tmp_path, "review-2-patch")
        outline = page.locator(".slideloop-map path[stroke='#ffd400']").bounding_box()
        assert outline is not None and outline["width"] > 150  # the patch fills the view

        # --- draw a polygon inside the patch and save it ------------------------------------------------
        labels_before = {}
        for src in _tile_srcs(page, "labels"):
            labels_before[_tile_key(src)] = srv.get(_tile_key(src).removeprefix("/"))[1]
        assert labels_before
        cx, cy = outline["x"] + outline["width"] / 2, outline["y"] + outline["height"] / 2
        r = outline["width"] * 0.3
        page.click(".leaflet-draw-draw-polygon")
        points = [(cx - r, cy - r), (cx + r, cy - r * 0.8), (cx + r * 0.9, cy + r), (cx - r * 0.8, cy + r * 0.9)]
        for x, y in points:
            page.mouse.click(x, y)
            page.wait_for_timeout(150)
        page.mouse.click(*points[0])  # closing the ring finishes the polygon
        page.wait_for_function("() => document.querySelector('.slideloop-message').innerText.includes('to save')",
                               timeout=TIMEOUT)
        with Project.open(project_dir) as proj:
            version_before = proj.label_version(1)
        page.click("button.slideloop-save")
        page.wait_for_function("() => document.querySelector('.slideloop-message').innerText.includes('Saved label')",
                               timeout=TIMEOUT)
        assert "marked reviewed" in _message(page)
        with Project.open(project_dir) as proj:
            assert proj.label_version(1) == version_before + 1
            with proj.store.read() as s:
                reviews = s.scalars(select(ReviewRow).where(ReviewRow.patch_id == patch_id)).all()
            assert [r.label_version for r in reviews] == [version_before + 1]

        # --- the label overlay refetches and shows the correction ---------------------------------------
        page.wait_for_selector(".slideloop-map img.leaflet-tile-loaded[src*='/slideloop/labels/'][src*='v=1']",
                               timeout=TIMEOUT)
        page.wait_for_timeout(1500)
        save_screenshot(page, tmp_path, "review-3-saved")
        changed = [k for k, old in labels_before.items() if srv.get(k.removeprefix("/"))[1] != old]
        assert changed, "no label tile changed after saving"
        refetched = {_tile_key(u) for u in requests if "/slideloop/labels/" in u and "v=1" in u}
        assert set(changed) <= refetched
        assert page.locator(".slideloop-queue select option").nth(0).inner_text().startswith(("○", "●"))
        assert any(o.startswith("✓") for o in page.locator(".slideloop-queue select option").all_inner_texts())

        # --- a slide whose file went missing: a visible message, the rest still works -------------------
        page.locator(".slideloop-slide select").select_option(label="moved-away")
        page.wait_for_function("() => document.querySelector('.slideloop-message').innerText.includes('missing')",
                               timeout=TIMEOUT)
        assert "moved-away" in _message(page)
        page.wait_for_timeout(1000)
        save_screenshot(page, tmp_path, "review-4-missing-file")
        page.locator(".slideloop-slide select").select_option(label="CMU-1-Small-Region")
        page.wait_for_selector(".slideloop-map img.leaflet-tile-loaded[src*='/slideloop/tiles/1/']", timeout=TIMEOUT)
        page.click("button.slideloop-next")
        page.wait_for_selector(".slideloop-map path[stroke='#ffd400']", timeout=TIMEOUT)

        # --- nothing left this machine -----------------------------------------------------------------
        assert outside_requests(requests) == []
        assert srv.app_tracebacks() == []


def _label_alpha(srv, z: int, x: int, y: int) -> int:
    status, body, headers = srv.get(f"slideloop/labels/1/{z}/{x}/{y}.png")
    assert status == 200 and headers["Content-Type"] == "image/png"
    return int(Image.open(io.BytesIO(body)).getextrema()[3][1])


def test_correction_persists_after_restart(tmp_path: Path, sample_svs: Path) -> None:
    """A correction saved while one server runs is shown by the next one: the store keeps it, not the kernel
    or the tile cache. Its own project, so it runs alone or in any order."""
    with Project.create(tmp_path / "proj") as proj:
        proj.add_slide(sample_svs)
        proj.build_grid(GridSpec(patch=256))
    root = (tmp_path / "proj").resolve()
    z, x, y = 4, 2, 3  # a full-resolution tile: level-0 px 512..768 x 768..1024
    with app_server(root, tmp_path / "first") as srv:
        assert _label_alpha(srv, z, x, y) == 0  # nothing labelled yet
        with Project.open(root) as proj:  # what the review kernel does on Save
            state = AppState(proj, author="tester")
            scale = 2.0 ** state.pyramid().zmax
            ring = [[px / scale, -py / scale] for px, py in ((560, 800), (720, 800), (720, 980), (560, 980), (560, 800))]
            state.mode = 1
            assert state.add_drawn({"type": "Feature", "properties": {},
                                    "geometry": {"type": "Polygon", "coordinates": [ring]}})
            assert state.save() == 1, state.message
        assert _label_alpha(srv, z, x, y) == 255  # the running server shows the new version
    with app_server(root, tmp_path / "second") as srv:
        assert _label_alpha(srv, z, x, y) == 255
        assert _label_alpha(srv, z, x + 2, y) == 0  # and only there
        assert srv.app_tracebacks() == []
