"""The Review tab's model switch in headless Chromium against a real Voilà server: a kept-back version can be
made the ranking model from the picker, and the choice is the project's active model."""

from __future__ import annotations

from pathlib import Path

import pytest
from _browser import app_server, browser_page, outside_requests
from _engine import TINY, clone

from al_core.learn.predict import predict
from al_core.learn.train import TrainOptions, train
from al_core.project.project import Project

pytestmark = pytest.mark.slow
TIMEOUT = 90_000  # ms; a cold kernel on two shared cores


def test_switch_to_the_kept_back_model_and_back(trained: tuple[Path, int], tmp_path: Path) -> None:
    src, first = trained
    with clone(src, tmp_path / "proj") as proj:
        res = train(proj, TrainOptions(epochs=1, max_steps=1, lr=1e-7, val_fraction=0.1, seed=0), **TINY)
        second = res.model_id
        assert res.evaluation is not None and not res.evaluation["promoted"]
        predict(proj, second, batch_size=16)
    root = (tmp_path / "proj").resolve()
    with app_server(root, tmp_path) as srv, browser_page() as (page, requests):
        page.goto(srv.app_url())
        page.wait_for_selector(".slideloop-model-pick select", timeout=TIMEOUT)
        assert f"Model {first}" in page.inner_text(".slideloop-model")  # the active one ranks the queue
        page.wait_for_function("() => document.querySelectorAll('.slideloop-model-pick select option').length >= 2",
                               timeout=TIMEOUT)
        labels = [" ".join(t.split()) for t in page.locator(".slideloop-model-pick select option").all_inner_texts()]
        assert any(f"model {second}" in t and "kept back" in t for t in labels), labels
        assert any(f"model {first}" in t and "active" in t for t in labels), labels
        # option labels carry non-breaking spaces (ipywidgets): pick by position
        page.locator(".slideloop-model-pick select").select_option(index=next(
            i for i, t in enumerate(labels) if f"model {second}" in t))
        page.wait_for_function(f"() => document.querySelector('.slideloop-model').innerText.includes('Model {second}')",
                               timeout=TIMEOUT)
        with Project.open(root) as proj:
            assert proj.models.active().id == second and proj.models.active_record()["chosen"] is True
        labels = [" ".join(t.split()) for t in page.locator(".slideloop-model-pick select option").all_inner_texts()]
        page.locator(".slideloop-model-pick select").select_option(index=next(
            i for i, t in enumerate(labels) if f"model {first}" in t))
        page.wait_for_function(f"() => document.querySelector('.slideloop-model').innerText.includes('Model {first}')",
                               timeout=TIMEOUT)
        with Project.open(root) as proj:
            assert proj.models.active().id == first
        assert outside_requests(requests) == []
    assert srv.app_tracebacks() == []
