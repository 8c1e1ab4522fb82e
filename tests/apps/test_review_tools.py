"""The review map's tools as a reviewer uses them: keys pressed anywhere on the page, a brush stroke and an
eraser stroke dragged with the mouse, a wand click with Shift to add, undo across a save, in headless Chromium
against a real server; each step checks the geometry the project stored (class and area of the change)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
from _browser import app_server, browser_page, outside_requests, save_screenshot
from shapely.geometry import Point, box
from slideloop_apps.state import AppState

from al_core.project.label_edits import class_areas
from al_core.project.project import Project
from al_core.wsi.grid import GridSpec

pytestmark = pytest.mark.slow
TIMEOUT = 90_000
OUTLINE = ".slideloop-map path[stroke='#ffd400']"
RADIUS_UM = 8.0  # the brush's default size


@pytest.fixture()
def project_dir(tmp_path: Path, sample_svs: Path) -> Path:
    """The sample slide with a grid and no labels: every painted pixel is the brush's."""
    svs = shutil.copy(sample_svs, tmp_path / sample_svs.name)
    with Project.create(tmp_path / "proj", ["Epithelium:#c80000", "Stroma:#00a000"]) as proj:
        proj.add_slide(svs)
        proj.build_grid(GridSpec(patch=256))
    return (tmp_path / "proj").resolve()


def _areas(root: Path) -> tuple[int, dict[int, float]]:
    with Project.open(root) as proj:
        shapes = [(a.class_idx, a.geometry) for a in proj.annotations(1)]
        return proj.label_version(1), class_areas(shapes)


def _wait_message(page, text: str) -> None:
    try:
        page.wait_for_function("t => document.querySelector('.slideloop-message').innerText.includes(t)",
                               arg=text, timeout=TIMEOUT)
    except Exception as err:
        page.screenshot(path="/tmp/w12-fail.png")
        raise AssertionError(f"waited for {text!r}; the page says {page.inner_text('.slideloop-message')!r}") from err


def _press(page, key: str, expect: str) -> None:
    page.keyboard.press(key)
    _wait_message(page, expect)


def _settled_outline(page) -> dict[str, float]:
    """The current patch's outline on screen once the map stopped moving (screen px map to slide px then)."""
    last = None
    for _ in range(50):
        page.wait_for_timeout(400)
        now = page.locator(OUTLINE).bounding_box()
        if now is not None and now == last:
            return now
        last = now
    raise AssertionError(f"the map did not settle: {last}")


def _drag(page, points: list[tuple[float, float]]) -> None:
    page.mouse.move(*points[0])
    page.mouse.down()
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        page.mouse.move(x1, y1, steps=max(2, int(math.dist((x0, y0), (x1, y1)) / 8)))
    page.mouse.up()


def test_brush_wand_eraser_and_keys(project_dir: Path, tmp_path: Path) -> None:
    with Project.open(project_dir) as proj:
        mpp = proj.slide_row(1).mpp
        queue = AppState(proj).queue
        first, second = proj.patch(queue[0].patch_id), proj.patch(queue[1].patch_id)
    radius = RADIUS_UM / mpp  # level-0 px
    with app_server(project_dir, tmp_path) as srv, browser_page((1280, 800)) as (page, requests):
        page.goto(srv.app_url())
        page.wait_for_selector(".slideloop-map img.leaflet-tile-loaded[src*='/slideloop/tiles/']", timeout=TIMEOUT)
        page.wait_for_selector(".slideloop-tools-canvas", state="attached", timeout=TIMEOUT)

        # --- n from anywhere on the page picks the first queue patch -------------------------------------
        page.mouse.click(5, 5)  # focus on the page, not on a control
        page.keyboard.press("n")
        page.wait_for_selector(OUTLINE, timeout=TIMEOUT)
        outline = _settled_outline(page)
        ds = first.size / outline["width"]  # level-0 px per screen px at this zoom

        # --- brush: b, drag across the patch, s ----------------------------------------------------------
        _press(page, "b", "Brush")
        cx, cy = outline["x"] + outline["width"] / 2, outline["y"] + outline["height"] / 2
        length = outline["width"] * 0.5
        page.mouse.move(cx, cy)
        page.wait_for_timeout(300)
        save_screenshot(page, tmp_path, "review-tools-brush-cursor")
        _drag(page, [(cx - length / 2, cy), (cx + length / 2, cy)])
        _wait_message(page, "to save")
        _press(page, "s", "Saved label version 1")
        assert "on to the next patch" in page.inner_text(".slideloop-message")
        version, areas = _areas(project_dir)
        expected = 2 * radius * length * ds + math.pi * radius**2
        assert version == 1 and set(areas) == {1}
        assert areas[1] == pytest.approx(expected, rel=0.12)
        with Project.open(project_dir) as proj:
            stroke = proj.annotations(1)[0].geometry
            assert box(first.x, first.y, first.x + first.size, first.y + first.size).contains(stroke.centroid)

        # --- wand: w, click, Shift-click adds, Enter/s applies with class 2 -------------------------------
        outline = _settled_outline(page)
        cx, cy = outline["x"] + outline["width"] / 2, outline["y"] + outline["height"] / 2
        _press(page, "2", "Drawing as Stroma")  # class 2 …
        _press(page, "w", "Wand")  # … then the wand
        page.mouse.click(cx, cy)
        _wait_message(page, "Wand selection")
        first_sel = page.inner_text(".slideloop-message")
        page.keyboard.down("Shift")
        page.mouse.click(cx + outline["width"] * 0.3, cy + outline["height"] * 0.3)
        page.keyboard.up("Shift")
        page.wait_for_function("t => !document.querySelector('.slideloop-message').innerText.includes(t)",
                               arg=first_sel, timeout=TIMEOUT)
        save_screenshot(page, tmp_path, "review-tools-wand-preview")
        _press(page, "s", "Saved label version 2")
        version, areas = _areas(project_dir)
        assert version == 2 and areas[1] == pytest.approx(expected, rel=0.12)
        assert 0 < areas[2] <= 2 * (384 * ds) ** 2  # two clicks, each within its window
        with Project.open(project_dir) as proj:
            wand = next(a.geometry for a in proj.annotations(1) if a.class_idx == 2)
            centre = Point(second.x + second.size / 2, second.y + second.size / 2)
            assert wand.distance(centre) < 4 * ds  # the click's region holds (or touches) the clicked point

        # --- eraser over the first stroke: p p goes back two patches, e, the same drag ------------------
        page.keyboard.press("p")
        _settled_outline(page)  # one move at a time, as a reviewer looks at each patch
        page.keyboard.press("p")
        outline = _settled_outline(page)
        save_screenshot(page, tmp_path, "review-tools-back")
        cx, cy = outline["x"] + outline["width"] / 2, outline["y"] + outline["height"] / 2
        _press(page, "e", "Eraser")
        _drag(page, [(cx - length / 2 - 20, cy), (cx + length / 2 + 20, cy)])
        _wait_message(page, "to save")
        page.locator(".slideloop-auto input").uncheck()  # stay on this patch after saving
        _press(page, "s", "Saved label version 3")
        _, areas = _areas(project_dir)
        assert areas.get(1, 0.0) < 0.05 * expected  # the wider eraser stroke took the brush stroke away

        # --- undo across the save (Ctrl+Z), redo, the help, overlays -------------------------------------
        _press(page, "Control+z", "Undid the last saved edit")
        _, areas = _areas(project_dir)
        assert areas[1] == pytest.approx(expected, rel=0.12)
        _press(page, "Control+Shift+Z", "Redid")
        _, areas = _areas(project_dir)
        assert areas.get(1, 0.0) < 0.05 * expected
        page.keyboard.press("?")
        page.wait_for_selector(".slideloop-help", state="visible", timeout=TIMEOUT)
        save_screenshot(page, tmp_path, "review-tools-help")
        _press(page, "l", "Labels overlay hidden")
        _press(page, "l", "Labels overlay shown")
        page.keyboard.press("?")  # close the help again

        # --- edit a saved polygon: v picks it, 2 changes its class, Delete removes it (a version each) ---
        remnant = _areas(project_dir)[1].get(1, 0.0)  # what the eraser left of the first stroke, if anything
        _press(page, "1", "Drawing as Epithelium")
        _drag(page, [(cx - length / 2, cy + 40), (cx + length / 2, cy + 40)])
        _press(page, "s", "Saved label version 6")
        _, areas = _areas(project_dir)
        painted = areas[1] - remnant
        assert painted == pytest.approx(expected, rel=0.15)  # the same stroke as the first one
        _press(page, "v", "Select")
        page.mouse.click(cx, cy + 40)
        _wait_message(page, "picked")
        _press(page, "2", "Changed the class")
        version, areas = _areas(project_dir)
        assert version == 7 and areas.get(1, 0.0) == pytest.approx(remnant, abs=1.0)
        assert areas[2] >= painted * 0.99
        reclassed = areas[2]
        page.mouse.click(cx, cy + 40)
        _wait_message(page, "picked")
        _press(page, "Delete", "Deleted polygon")
        version, areas = _areas(project_dir)
        assert version == 8 and areas.get(2, 0.0) == pytest.approx(reclassed - painted, abs=1.0)

        assert outside_requests(requests) == []
        assert srv.app_tracebacks() == []


def test_error_map_contours_and_accept_by_keys(trained: tuple[Path, int], tmp_path: Path) -> None:
    """With a model: m shows the error map, the patch's prediction is a dashed vector outline, a accepts it
    (one version, then the next patch), at the small 1280×800 screen the queue stays on the page."""
    root = tmp_path / "proj"
    shutil.copytree(trained[0], root)
    with Project.open(root) as proj:
        before = proj.label_version(1)
        worst = AppState(proj).queue[0].patch_id
    with app_server(root.resolve(), tmp_path) as srv, browser_page((1280, 800)) as (page, requests):
        page.goto(srv.app_url())
        page.wait_for_selector(".slideloop-map img.leaflet-tile-loaded[src*='/slideloop/prediction/']",
                               timeout=TIMEOUT)
        page.mouse.click(5, 5)
        page.keyboard.press("n")
        page.wait_for_selector(OUTLINE, timeout=TIMEOUT)
        page.wait_for_selector(".slideloop-map path[stroke-dasharray='6 4']:not([stroke='#ffd400'])",
                               timeout=TIMEOUT)  # the prediction's outline, drawn as vectors
        assert page.locator(".slideloop-map img[src*='/slideloop/errors/']").count() == 0  # off until asked
        _press(page, "m", "Errors overlay shown")
        page.wait_for_selector(".slideloop-map img.leaflet-tile-loaded[src*='/slideloop/errors/']", timeout=TIMEOUT)
        _settled_outline(page)
        save_screenshot(page, tmp_path, "review-tools-error-map")
        queue = page.locator(".slideloop-queue select").bounding_box()
        assert queue is not None and queue["y"] < 800 - 60  # some queue rows are on screen at 1280×800
        _press(page, "a", "Accepted the prediction")
        assert "on to the next patch" in page.inner_text(".slideloop-message")
        with Project.open(root) as proj:
            assert proj.label_version(1) == before + 1
            assert worst in proj.reviewed_patch_ids()
        assert outside_requests(requests) == []
        assert srv.app_tracebacks() == []


#: every tile on the map has loaded (Leaflet keeps a layer's old tiles until the new version's arrive)
_TILES_SETTLED = ("() => [...document.querySelectorAll('.slideloop-map img.leaflet-tile')]"
                  ".every(t => t.classList.contains('leaflet-tile-loaded'))")


def _polygon(root: Path) -> tuple[int, list[tuple[float, float]], float]:
    from al_core.project.vertex_edits import vertices

    with Project.open(root) as proj:
        anns = proj.annotations(1)
        assert len(anns) == 1, anns
        return proj.label_version(1), vertices(anns[0].geometry), anns[0].geometry.area


def test_vertex_editing_with_the_mouse(project_dir: Path, tmp_path: Path) -> None:
    """v picks a saved polygon and shows its vertices; dragging a corner moves it, dragging an edge's midpoint
    adds a vertex, Alt-click deletes one: each one label version, with the stored geometry as drawn."""
    with Project.open(project_dir) as proj:
        patch = proj.patch(AppState(proj).queue[0].patch_id)
        q = patch.size / 4
        x0, y0, x1, y1 = patch.x + q, patch.y + q, patch.x + 3 * q, patch.y + 3 * q
        proj.correct(1, box(x0, y0, x1, y1), 1, author="import")  # as if imported from QuPath: four corners
        row = [q.patch_id for q in AppState(proj).queue].index(patch.id)  # labelled: no longer first in line
    side = x1 - x0
    with app_server(project_dir, tmp_path) as srv, browser_page((1280, 800)) as (page, requests):
        page.goto(srv.app_url())
        page.wait_for_selector(".slideloop-tools-canvas", state="attached", timeout=TIMEOUT)
        page.wait_for_selector(".slideloop-queue select option", state="attached", timeout=TIMEOUT)
        page.locator(".slideloop-queue select").select_option(index=row)
        page.wait_for_selector(OUTLINE, timeout=TIMEOUT)
        outline = _settled_outline(page)
        ds = patch.size / outline["width"]  # level-0 px per screen px
        page.mouse.click(5, 5)  # the page has the keys, not the list

        def screen(x: float, y: float) -> tuple[float, float]:
            return outline["x"] + (x - patch.x) / ds, outline["y"] + (y - patch.y) / ds

        _press(page, "v", "Select")
        page.mouse.click(*screen((x0 + x1) / 2, (y0 + y1) / 2))
        _wait_message(page, "picked")
        page.wait_for_selector(".slideloop-tools-canvas[data-handles='4']", timeout=TIMEOUT)
        assert _settled_outline(page) == outline  # the longer message did not move the map
        save_screenshot(page, tmp_path, "review-tools-vertices")

        # --- drag the bottom-right corner 30 px down and right: the square gains two triangles ------------
        version0 = _polygon(project_dir)[0]
        sx, sy = screen(x1, y1)
        _drag(page, [(sx, sy), (sx + 30, sy + 30)])
        _wait_message(page, "Moved a vertex")
        version, pts, area = _polygon(project_dir)
        d = 30 * ds
        assert version == version0 + 1 and len(pts) == 4
        assert area == pytest.approx(side**2 + side * d, rel=0.03)
        assert min(math.dist(p, (x1 + d, y1 + d)) for p in pts) < 3 * ds

        # --- drag the top edge's midpoint 20 px up: a fifth vertex, plus a triangle of base `side` -----------
        page.wait_for_selector(".slideloop-tools-canvas[data-handles='4']", timeout=TIMEOUT)
        mx, my = screen((x0 + x1) / 2, y0)
        _drag(page, [(mx, my), (mx, my - 20)])
        _wait_message(page, "Added a vertex")
        version, pts, bumped = _polygon(project_dir)
        assert version == version0 + 2 and len(pts) == 5
        (vx, vy), = [p for p in pts if p[1] < y0 - 1]  # the new vertex, where the mouse let go
        assert abs(vx - (x0 + x1) / 2) < 3 * ds and abs(vy - (y0 - 20 * ds)) < 3 * ds
        assert bumped - area == pytest.approx(side * (y0 - vy) / 2, rel=1e-3)  # a triangle on the top edge

        # --- Alt-click that vertex: back to four, and to the area before -----------------------------------
        page.wait_for_selector(".slideloop-tools-canvas[data-handles='5']", timeout=TIMEOUT)
        page.keyboard.down("Alt")
        vsx, vsy = screen(vx, vy)
        page.mouse.click(vsx, vsy)
        page.keyboard.up("Alt")
        _wait_message(page, "Deleted a vertex")
        version, pts, after = _polygon(project_dir)
        assert version == version0 + 3 and len(pts) == 4 and after == pytest.approx(area, rel=1e-6)
        page.wait_for_selector(".slideloop-tools-canvas[data-handles='4']", timeout=TIMEOUT)
        page.wait_for_function(_TILES_SETTLED, timeout=TIMEOUT)
        save_screenshot(page, tmp_path, "review-tools-vertices-edited")
        assert outside_requests(requests) == []
        assert srv.app_tracebacks() == []
