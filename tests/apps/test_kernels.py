"""Kernels of the app's pages on a long-running server: a closed page shuts its kernel down, and the kernel of a
page that died without closing is culled once idle, and the app's warm kernel (waiting for the next page) is
never culled. A real ``jupyter server`` driven by headless Chromium; the kernels come from Jupyter's own
``GET /api/kernels``, the kernel a page uses from the page's own requests."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from _browser import AppServer, app_server, browser_page, page_kernel, warm_kernels
from conftest import run_cli

pytestmark = pytest.mark.slow
TIMEOUT = 90_000  # ms; a cold kernel on two shared cores
VISITS = 10
#: what shows that each view has rendered (its widgets, hence Voilà's widget manager with its unload handler)
READY = {
    "index.ipynb": ".slideloop-view-link",
    "review.ipynb": ".slideloop-map img.leaflet-tile-loaded[src*='/slideloop/tiles/']",
    "deploy.ipynb": ".slideloop-map img.leaflet-tile-loaded[src*='/slideloop/tiles/']",
}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("kernels") / "demo"
    run_cli("demo", "--dir", str(folder), "--prepare-only")
    return folder.resolve()


def kernel_ids(srv: AppServer) -> set[str]:
    status, body, _ = srv.get("api/kernels")
    assert status == 200, body
    return {k["id"] for k in json.loads(body)}


def wait_for_kernels(srv: AppServer, gone: str, count: int, timeout: float = 60) -> set[str]:
    """Poll until kernel ``gone`` has stopped and ``count`` kernels run (the warm pool refilled); the last set."""
    deadline = time.monotonic() + timeout
    while ((ids := kernel_ids(srv)) and gone in ids or len(ids) != count) and time.monotonic() < deadline:
        time.sleep(0.5)
    return ids


def wait_for_warm(srv: AppServer, timeout: float = 90) -> set[str]:
    """The running kernels once the app's warm kernel is ready (a page opened earlier would take the server's
    first kernel start instead)."""
    deadline = time.monotonic() + timeout
    while not warm_kernels(srv) and time.monotonic() < deadline:
        time.sleep(0.3)
    assert warm_kernels(srv), srv.log_text()[-3000:]
    return kernel_ids(srv)


# one view per test, so each stays well inside the per-test timeout on a slow CI machine
@pytest.mark.parametrize("notebook", list(READY))
def test_closing_each_view_shuts_its_kernel_down(demo: Path, tmp_path: Path, notebook: str) -> None:
    ready = READY[notebook]
    with app_server(demo, tmp_path) as srv, browser_page() as (page, _):
        baseline = wait_for_warm(srv)
        # tabs of one browser window: closing a tab leaves the browser running to send the page's last request
        window = page.context.browser.new_context()
        page.close()
        for visit in range(VISITS):
            page = window.new_page()  # a new tab each visit
            page.goto(f"{srv.url}voila/render/{notebook}?token={srv.token}")
            page.wait_for_selector(ready, timeout=TIMEOUT)
            kernel = page_kernel(page)
            assert kernel in kernel_ids(srv), f"{notebook} visit {visit}: the page's kernel runs"
            page.close(run_before_unload=True)  # as a closed tab: Voilà's unload handler runs
            left = wait_for_kernels(srv, kernel, len(baseline))
            assert kernel not in left, f"{notebook} visit {visit}: the closed page's kernel still runs"
            assert len(left) == len(baseline), f"{notebook} visit {visit}: kernels {left} against {baseline}"
        assert "_xsrf' argument missing" not in srv.log_text()
        assert srv.app_tracebacks() == []


def test_kernel_of_a_page_that_died_is_culled_once_idle(demo: Path, tmp_path: Path) -> None:
    with app_server(demo, tmp_path, cull=(4, 1)) as srv, browser_page() as (page, _):
        baseline = wait_for_warm(srv)
        page.goto(f"{srv.url}voila/render/index.ipynb?token={srv.token}")
        page.wait_for_selector(READY["index.ipynb"], timeout=TIMEOUT)
        kernel = page_kernel(page)
        deadline = time.monotonic() + 90
        while len(warm_kernels(srv)) < 2 and time.monotonic() < deadline:
            time.sleep(0.3)
        refill = warm_kernels(srv)[-1]
        page.wait_for_timeout(8000)  # twice the idle timeout: an open page keeps its kernel
        assert kernel in kernel_ids(srv)
        assert refill != kernel and refill in kernel_ids(srv), "the pool's new kernel, idle 8 s, is not culled"
        page.close(run_before_unload=False)  # a crashed tab: no unload handler, no shutdown call
        left = wait_for_kernels(srv, kernel, len(baseline))
        assert kernel not in left and refill in left
        culled = [line for line in srv.log_text().splitlines() if line.startswith("[W") and "Culling" in line]
        assert any(kernel in line for line in culled), "shut down by the idle culler, not by anything else"
