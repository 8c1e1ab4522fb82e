"""Two annotators on one patch, each in their own headless Chromium context against one real Voilà server (one
kernel each): disjoint brush strokes saved at nearly the same moment are both in the latest label version; an
overlapping stroke drawn on a view older than the other's save is refused with a message, and stays on the map."""

from __future__ import annotations

import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _browser import CHROMIUM, CHROMIUM_ARGS, app_server, outside_requests, save_screenshot
from shapely.geometry import box

from al_core.project.label_edits import class_areas
from al_core.project.project import Project
from al_core.wsi.grid import GridSpec

pytestmark = pytest.mark.slow
TIMEOUT = 90_000  # ms; two cold kernels on shared cores
OUTLINE = ".slideloop-map path[stroke='#ffd400']"
EPITHELIUM, STROMA = "#c80000", "#00a000"
UNSAVED = f".slideloop-map path[stroke='{EPITHELIUM}']"  # the 'Unsaved shapes' layer (labels are tiles)
RADIUS_UM = 8.0  # the brush's default size


@pytest.fixture(scope="module")
def project_dir(tmp_path_factory: pytest.TempPathFactory, sample_svs: Path) -> Path:
    tmp = tmp_path_factory.mktemp("two-annotators")
    svs = shutil.copy(sample_svs, tmp / sample_svs.name)
    with Project.create(tmp / "proj", [f"Epithelium:{EPITHELIUM}", f"Stroma:{STROMA}"]) as proj:
        proj.add_slide(svs)
        proj.build_grid(GridSpec(patch=256))
    return (tmp / "proj").resolve()


@pytest.fixture(scope="module")
def server(project_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with app_server(project_dir, tmp_path_factory.mktemp("server")) as srv:
        yield srv


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture()
def annotators(browser: Any, server: Any) -> Iterator[tuple[Any, Any, list[str]]]:
    """Two pages in separate browser contexts (no shared cookies or storage), each with its own app kernel."""
    contexts = [browser.new_context(viewport={"width": 1280, "height": 800}) for _ in range(2)]
    requests: list[str] = []
    pages = []
    for ctx in contexts:
        page = ctx.new_page()
        page.on("request", lambda r: requests.append(r.url))
        page.goto(server.app_url())
        pages.append(page)
    try:
        for page in pages:  # both load at once; wait for each in turn
            page.wait_for_selector(".slideloop-map img.leaflet-tile-loaded[src*='/slideloop/tiles/']",
                                   timeout=TIMEOUT)
            page.wait_for_selector(".slideloop-tools-canvas", state="attached", timeout=TIMEOUT)
            page.locator(".slideloop-auto input").uncheck()  # stay on the patch after saving
        yield pages[0], pages[1], requests
    finally:
        for ctx in contexts:
            ctx.close()


def _wait_message(page: Any, text: str) -> str:
    try:
        page.wait_for_function("t => document.querySelector('.slideloop-message').innerText.includes(t)",
                               arg=text, timeout=TIMEOUT)
    except Exception as err:
        raise AssertionError(f"waited for {text!r}; the page says {page.inner_text('.slideloop-message')!r}") from err
    return str(page.inner_text(".slideloop-message"))


def _press(page: Any, key: str, expect: str) -> str:
    page.keyboard.press(key)
    return _wait_message(page, expect)


def _open_first_patch(page: Any) -> dict[str, float]:
    """``n`` picks the first queue patch; its outline on screen once the map stopped moving."""
    page.mouse.click(5, 5)  # focus on the page, not on a control
    page.keyboard.press("n")
    page.wait_for_selector(OUTLINE, timeout=TIMEOUT)
    last = None
    for _ in range(50):
        page.wait_for_timeout(400)
        now = page.locator(OUTLINE).bounding_box()
        if now is not None and now == last:
            return dict(now)
        last = now
    raise AssertionError(f"the map did not settle: {last}")


def _stroke(page: Any, outline: dict[str, float], at: float, length: float = 0.5) -> None:
    """Drag a horizontal brush stroke at height ``at`` (0–1) of the patch, ``length`` of its width, centred."""
    cx, y = outline["x"] + outline["width"] / 2, outline["y"] + outline["height"] * at
    half = outline["width"] * length / 2
    page.mouse.move(cx - half, y)
    page.mouse.down()
    page.mouse.move(cx + half, y, steps=max(2, int(2 * half / 8)))
    page.mouse.up()
    _wait_message(page, "to save")


def _first_patch(project_dir: Path) -> Any:
    """The queue's first patch as a fresh kernel sees it (``n`` goes there)."""
    from slideloop_apps.state import AppState

    with Project.open(project_dir) as proj:
        return proj.patch(AppState(proj).queue[0].patch_id)


def _stroke_region(patch: Any, outline: dict[str, float], at: float, radius: float, length: float = 0.5) -> Any:
    """Where :func:`_stroke` paints, in level-0 px: the dragged line grown by the brush radius."""
    from shapely.geometry import LineString

    ds = patch.size / outline["width"]
    y = patch.y + patch.size * at
    half = patch.size * length / 2
    cx = patch.x + patch.size / 2
    return LineString([(cx - half, y), (cx + half, y)]).buffer(radius + 3 * ds)  # a few px of slack


def _stroke_area(patch: Any, radius: float, length: float = 0.5) -> float:
    """The area :func:`_stroke` paints: a line of ``length`` of the patch width, grown by the brush radius."""
    return 2 * radius * patch.size * length + math.pi * radius**2


def _latest(project_dir: Path, region: Any) -> tuple[int, dict[int, float]]:
    """The slide's latest label version and the area of each class inside ``region`` (level-0 px)."""
    with Project.open(project_dir) as proj:
        shapes = [(a.class_idx, a.geometry.intersection(region)) for a in proj.annotations(1)]
        return proj.label_version(1), class_areas(shapes)


def _radius(project_dir: Path) -> float:
    with Project.open(project_dir) as proj:
        return RADIUS_UM / float(proj.slide_row(1).mpp)  # level-0 px


def test_disjoint_strokes_saved_at_once_are_both_kept(annotators: tuple[Any, Any, list[str]], project_dir: Path,
                                                       server: Any, tmp_path: Path) -> None:
    a, b, requests = annotators
    patch, radius = _first_patch(project_dir), _radius(project_dir)
    with Project.open(project_dir) as proj:
        before = proj.label_version(1)
    outlines = [_open_first_patch(page) for page in (a, b)]
    for page, outline, at in ((a, outlines[0], 0.25), (b, outlines[1], 0.75)):
        _press(page, "b", "Brush")
        _stroke(page, outline, at)
    a.keyboard.press("s")  # both save at nearly the same moment: two kernels, one project
    b.keyboard.press("s")
    said = [_wait_message(page, "Saved label version") for page in (a, b)]
    save_screenshot(b, tmp_path, "two-annotators-both-saved")
    assert said[0] != said[1]  # two versions, one each

    version, _ = _latest(project_dir, box(patch.x, patch.y, patch.x + patch.size, patch.y + patch.size))
    assert version == before + 2
    for outline, at in ((outlines[0], 0.25), (outlines[1], 0.75)):
        _, areas = _latest(project_dir, _stroke_region(patch, outline, at, radius))
        # Epithelium (the default class) fills the stroke; grid patches overlap, so the other test's stroke on a
        # neighbouring patch may reach into the slack around it
        assert areas[1] == pytest.approx(_stroke_area(patch, radius), rel=0.15)
    assert outside_requests(requests) == []
    assert server.app_tracebacks() == []


def test_a_stale_overlapping_stroke_is_refused_and_stays_on_the_map(
        annotators: tuple[Any, Any, list[str]], project_dir: Path, server: Any, tmp_path: Path) -> None:
    a, b, requests = annotators
    patch, radius = _first_patch(project_dir), _radius(project_dir)
    outline_a = _open_first_patch(a)
    outline_b = _open_first_patch(b)  # B's view: the labels before A's edit
    _press(a, "2", "Drawing as Stroma")
    _press(a, "b", "Brush")
    _stroke(a, outline_a, 0.5)
    theirs = int(_press(a, "s", "Saved label version").split("Saved label version")[1].split()[0])

    _press(b, "b", "Brush")  # Epithelium, across A's stroke (a little lower, so both show), on the older view
    _stroke(b, outline_b, 0.53)
    unsaved = b.locator(UNSAVED).count()
    assert unsaved >= 1
    said = _press(b, "s", "Not saved")
    assert "changed by" in said and "redo the edit" in said and "still on the map" in said
    b.wait_for_timeout(500)  # let the overlays refetch (they now show A's stroke)
    save_screenshot(b, tmp_path, "two-annotators-conflict")
    assert b.locator(UNSAVED).count() == unsaved  # B's shape is still drawn, to redo

    version, areas = _latest(project_dir, _stroke_region(patch, outline_a, 0.5, radius))
    assert version == theirs  # nothing of B's was written
    assert areas[2] == pytest.approx(_stroke_area(patch, radius), rel=0.15)  # B's overlap did not cut into it
    assert outside_requests(requests) == []
    assert server.app_tracebacks() == []
