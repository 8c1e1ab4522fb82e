"""The landing page ``slideloop app`` opens by default, and ``slideloop demo --prepare-only``: a real
``jupyter server`` (under a non-root base URL, as on a hub or Binder) driven by headless Chromium."""

from __future__ import annotations

from pathlib import Path

import pytest
from _browser import app_server, browser_page, outside_requests
from conftest import run_cli

from al_core.project.project import Project

TIMEOUT = 90_000  # ms; a cold kernel on two shared cores
BASE = "/base/x/"


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("landing") / "demo"
    proc = run_cli("demo", "--dir", str(folder), "--prepare-only")
    assert proc.stdout.strip().splitlines()[-1] == str(folder.resolve())
    return folder


def test_demo_prepare_only_builds_the_sample_project(demo: Path) -> None:
    with Project.open(demo) as proj:
        assert [s.name for s in proj.slides()] == ["CMU-1-Small-Region"]
        assert len(proj.patches()) > 0
    again = run_cli("demo", "--dir", str(demo), "--prepare-only")  # an existing project is kept as is
    assert "made the demo project" not in again.stdout


@pytest.mark.slow
def test_landing_page_links_both_views_under_the_base_url(demo: Path, tmp_path: Path) -> None:
    with app_server(demo.resolve(), tmp_path, base_url=BASE) as srv, browser_page() as (page, requests):
        page.goto(f"{srv.url}?token={srv.token}")  # the server's default URL: the landing page
        page.wait_for_selector(".slideloop-view-link", timeout=TIMEOUT)
        assert page.url.startswith(f"{srv.url}voila/render/index.ipynb")
        summary = page.inner_text(".slideloop-summary")
        assert "demo" in summary and "1 slide," in summary
        hrefs = page.eval_on_selector_all(".slideloop-view-link", "els => els.map(e => e.href)")
        assert hrefs == [f"{srv.url}voila/render/{nb}" for nb in ("review.ipynb", "deploy.ipynb")]

        page.locator(".slideloop-view-link", has_text="Deploy").click()
        page.wait_for_selector(".slideloop-map img.leaflet-tile-loaded[src*='/slideloop/tiles/1/']", timeout=TIMEOUT)
        assert page.url == f"{srv.url}voila/render/deploy.ipynb"
        page.go_back()
        page.locator(".slideloop-view-link", has_text="Review").click()
        page.wait_for_selector(".slideloop-tabs", timeout=TIMEOUT)
        assert page.locator(".lm-TabBar-tab", has_text="Train").count() == 1
        page.wait_for_selector(".slideloop-map img.leaflet-tile-loaded[src*='/slideloop/tiles/1/']", timeout=TIMEOUT)
        assert outside_requests(requests) == []
