"""First paint of the review view from a warm kernel: ``slideloop app`` keeps a started kernel with the app
imported (``slideloop_apps.kernels.WarmKernelManager``), the review URL's page is served from that kernel, its
slide tiles are painted, and the pool starts a replacement for the next page. A real ``jupyter server`` driven
by headless Chromium; no timings are asserted (bench/bench_tiles.py measures them)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from _browser import AppServer, app_server, browser_page, page_kernel, save_screenshot, warm_kernels
from conftest import run_cli

pytestmark = pytest.mark.slow
TIMEOUT = 90_000  # ms; a cold kernel on two shared cores
SLIDE_TILES = ".slideloop-map img.leaflet-tile[src*='/slideloop/tiles/']"


def kernel_ids(srv: AppServer) -> list[str]:
    status, body, _ = srv.get("api/kernels")
    assert status == 200, body
    return [k["id"] for k in json.loads(body)]


def wait_for_warm(srv: AppServer, count: int, timeout: float = 90) -> list[str]:
    """Poll the log until ``count`` warm kernels have been reported ready; all reported so far."""
    deadline = time.monotonic() + timeout
    while len(ready := warm_kernels(srv)) < count and time.monotonic() < deadline:
        time.sleep(0.3)
    assert len(ready) >= count, f"{count} warm kernel(s) expected, log:\n{srv.log_text()[-3000:]}"
    return ready


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("first-paint") / "demo"
    run_cli("demo", "--dir", str(folder), "--prepare-only")
    return folder.resolve()


def test_review_url_is_served_from_a_warm_kernel_and_paints_tiles(demo: Path, tmp_path: Path) -> None:
    with app_server(demo, tmp_path) as srv, browser_page() as (page, requests):
        (warm,) = wait_for_warm(srv, 1)
        assert kernel_ids(srv) == [warm], "before any page: only the warm kernel runs"

        page.goto(srv.app_url())
        page.wait_for_selector(f"{SLIDE_TILES}.leaflet-tile-loaded", timeout=TIMEOUT)
        painted = page.evaluate(
            f"() => Array.from(document.querySelectorAll(\"{SLIDE_TILES}\"))"
            ".filter(e => e.complete && e.naturalWidth > 0).map(e => e.getAttribute('src'))")
        assert painted, "slide tiles decoded in the page"
        assert all("/slideloop/tiles/1/" in src for src in painted)
        assert any("/slideloop/tiles/" in url for url in requests)
        save_screenshot(page, tmp_path, "first_paint_review")

        assert page_kernel(page) == warm, "the page runs in the kernel that was started before it was opened"
        assert f"page given warm kernel {warm}" in srv.log_text()
        # the widgets work in that kernel: the slide picker lists the project's slide
        assert "CMU-1-Small-Region" in page.inner_text("body")

        # the pool refills for the next page with a new kernel, and the page keeps its own
        ready = wait_for_warm(srv, 2)
        assert ready[1] != warm
        assert sorted(kernel_ids(srv)) == sorted([warm, ready[1]])
        assert srv.app_tracebacks() == []


def test_a_second_page_gets_the_refilled_kernel(demo: Path, tmp_path: Path) -> None:
    with app_server(demo, tmp_path) as srv, browser_page() as (page, _):
        first = wait_for_warm(srv, 1)[0]
        page.goto(srv.app_url())
        page.wait_for_selector(f"{SLIDE_TILES}.leaflet-tile-loaded", timeout=TIMEOUT)
        second = wait_for_warm(srv, 2)[1]
        other = page.context.browser.new_context().new_page()
        other.goto(srv.app_url())
        other.wait_for_selector(f"{SLIDE_TILES}.leaflet-tile-loaded", timeout=TIMEOUT)
        assert page_kernel(page) == first
        assert page_kernel(other) == second, "each page its own warm kernel, never a shared one"
        assert srv.app_tracebacks() == []


def test_stopping_the_server_while_a_kernel_warms_is_clean(demo: Path, tmp_path: Path) -> None:
    """The server stops while the pool's kernel is still importing the app: shutdown waits for it, then shuts
    it down; no task is destroyed pending and the kernel is not cut off in the middle of an execute."""
    with app_server(demo, tmp_path) as srv:
        assert warm_kernels(srv) == []  # answering already, the pool's kernel not ready yet
    log = srv.log_text()
    assert srv.proc.returncode == 0, log[-3000:]
    assert "Task was destroyed but it is pending" not in log
    assert "ZMQError" not in log and "Traceback" not in log, log[-3000:]


def test_listing_kernels_while_one_is_still_starting_does_not_fail() -> None:
    # Jupyter registers a kernel before it sets its last_activity; the pool starts kernels while pages list
    # them, and GET /api/kernels answered 500 in that window (CI)
    from jupyter_server.services.kernels.kernelmanager import ServerKernelManager
    from slideloop_apps.kernels import WarmKernelManager

    km = WarmKernelManager()
    km._kernels["starting"] = ServerKernelManager()  # as MultiKernelManager holds it mid-start
    [model] = km.list_kernels()
    assert model["id"] == "starting" and model["last_activity"]
