"""The training panel as a reviewer uses it: a real ``jupyter server`` with Voilà, the app's own Dask scheduler
and worker (as ``slideloop app`` starts them), headless Chromium. A tiny model trains on the CPU."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from _browser import app_server, browser_page, outside_requests, save_screenshot
from slideloop_apps.state import AppState
from slideloop_apps.train_panel import TrainPanel
from slideloop_apps.training import TrainingService, TrainSettings
from sqlalchemy import select

from al_core.cli.job_cluster import job_cluster
from al_core.project.jobs import SCHEDULER_ENV
from al_core.project.project import Project
from al_core.project.schema import JobRow, ModelRow
from al_core.wsi.grid import GridSpec

pytestmark = pytest.mark.slow
TIMEOUT = 90_000  # ms; a cold kernel on two shared cores
TINY = "tu-mobilenetv3_small_050"


@pytest.fixture(scope="module")
def project_dir(tmp_path_factory: pytest.TempPathFactory, sample_svs: Path, sample_geojson: Path) -> Path:
    d = tmp_path_factory.mktemp("train")
    svs = shutil.copy(sample_svs, d / sample_svs.name)
    with Project.create(d / "proj") as proj:
        proj.add_slide(svs)
        proj.build_grid(GridSpec(patch=256))
        proj.import_labels(sample_geojson)  # the sample's labels are the training set
    return (d / "proj").resolve()


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The app's job cluster (scheduler + one worker), in the environment the app servers and kernels inherit."""
    work = tmp_path_factory.mktemp("dask")
    old = os.environ.get(SCHEDULER_ENV)
    with job_cluster(work / "dask") as address:
        os.environ[SCHEDULER_ENV] = address  # app_server passes os.environ to the server and its kernels
        try:
            yield address
        finally:
            if old is None:
                os.environ.pop(SCHEDULER_ENV, None)
            else:
                os.environ[SCHEDULER_ENV] = old


@pytest.fixture(scope="module")
def server(project_dir: Path, scheduler: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """The app server on the module's project (no model yet), with the job cluster."""
    with app_server(project_dir, tmp_path_factory.mktemp("srv")) as srv:
        yield srv


@pytest.fixture
def with_model(trained: tuple[Path, int], tmp_path: Path) -> tuple[Path, int]:
    """A project with one finished model and its predictions: a copy of the session's trained project
    (conftest's ``trained``, the same tiny encoder as :data:`TINY`)."""
    root, model_id = trained
    shutil.copytree(root, tmp_path / "with-model")
    return (tmp_path / "with-model").resolve(), model_id


def _open_train_tab(page, srv) -> None:
    page.goto(srv.app_url())
    page.wait_for_selector(".slideloop-tabs", timeout=TIMEOUT)
    page.locator(".lm-TabBar-tab", has_text="Train").click()
    page.wait_for_selector(".slideloop-train-status", state="visible", timeout=TIMEOUT)


def _set(page, cls: str, value: str) -> None:
    box = page.locator(f".{cls} input")
    box.fill(value)
    box.press("Enter")  # ipywidgets' number boxes sync on Enter or blur


def _progress(page) -> float:
    style = page.get_attribute(".slideloop-train-progress .progress-bar", "style") or ""
    m = re.search(r"width:\s*([\d.]+)%", style)
    return float(m.group(1)) if m else 0.0


_BAR_FULL = """() => /width:\\s*100(\\.0+)?%/.test(
    document.querySelector('.slideloop-train-progress .progress-bar')?.getAttribute('style') || '')"""
_TWO_EPOCHS = "() => /\\b2 epochs plotted/.test(document.querySelector('.slideloop-curve-caption')?.innerText || '')"


def _epochs_plotted(page) -> int:
    m = re.search(r"(\d+) epochs? plotted", page.inner_text(".slideloop-curve-caption"))
    return int(m.group(1)) if m else 0


def _latest_done(project_dir: Path) -> int | None:
    with Project.open(project_dir) as proj:
        return AppState(proj).latest_model_id()


#: the widest option text of a <select>, its horizontal padding (room for the arrow) and its inner width
_FITS = """e => { const c = document.createElement('canvas').getContext('2d'); const st = getComputedStyle(e);
  c.font = `${st.fontSize} ${st.fontFamily}`;
  const widest = Math.max(...[...e.options].map(o => c.measureText(o.text).width));
  return [widest, parseFloat(st.paddingLeft) + parseFloat(st.paddingRight), e.clientWidth]; }"""


def test_retrain_from_the_panel(server, project_dir: Path, tmp_path: Path) -> None:
    """A new model from the panel on a project without one: progress, curve, versions, re-ranked queue."""
    srv = server
    with browser_page() as (page, requests):
        page.goto(srv.app_url())
        page.wait_for_selector(".slideloop-queue select option", state="attached", timeout=TIMEOUT)
        assert "No model is trained yet" in page.inner_text(".slideloop-model")
        first_before = page.locator(".slideloop-queue select option").nth(0).inner_text()
        assert not re.search(r"\d\.\d\d", first_before)  # no IoU without a model

        page.locator(".lm-TabBar-tab", has_text="Train").click()
        page.wait_for_selector(".slideloop-train-status", state="visible", timeout=TIMEOUT)
        assert "No training run yet" in page.inner_text(".slideloop-train-status")
        page.locator(".slideloop-encoder select").select_option(TINY)
        _set(page, "slideloop-epochs", "2")
        _set(page, "slideloop-batch", "4")
        _set(page, "slideloop-lr", "0.003")
        page.click("button.slideloop-train")

        # --- follow the run: the bar moves, the curve gains points, the UI answers meanwhile ------------
        seen_progress: list[float] = []
        seen_points: list[int] = []
        clicked_next = False
        deadline = time.monotonic() + 240
        while "finished" not in page.inner_text(".slideloop-train-status"):
            status = page.inner_text(".slideloop-train-status")
            assert "failed" not in status, status
            assert time.monotonic() < deadline, f"the run did not finish: {status}"
            seen_progress.append(_progress(page))
            seen_points.append(_epochs_plotted(page))
            if "is training" in status and not clicked_next:
                save_screenshot(page, tmp_path, "train-1-running")
                # the kernel is not blocked by training: the review tab still answers a click
                page.locator(".lm-TabBar-tab", has_text="Review").click()
                page.click("button.slideloop-next")
                page.wait_for_selector(".slideloop-map path[stroke='#ffd400']", timeout=TIMEOUT)
                # the outline and the queue's selection arrive as separate widget updates: wait for both
                page.wait_for_function("() => document.querySelector('.slideloop-queue select').value !== ''",
                                       timeout=TIMEOUT)
                page.locator(".lm-TabBar-tab", has_text="Train").click()
                clicked_next = True
            page.wait_for_timeout(200)
        assert clicked_next, "never saw the run training"
        partial = [p for p in seen_progress if 0 < p < 100]
        assert len(set(partial)) >= 2, f"the progress bar did not move during training: {seen_progress}"
        assert partial == sorted(partial)
        # each widget's update is its own message: give the bar and the curve a moment to catch up
        page.wait_for_function(_BAR_FULL, timeout=10_000)
        assert _progress(page) == pytest.approx(100.0)
        page.wait_for_function(_TWO_EPOCHS, timeout=10_000)
        assert _epochs_plotted(page) == 2 and 1 in seen_points + [_epochs_plotted(page)]
        assert max(seen_points) <= 2

        # --- the finished run: version table, active model, comparison -------------------------------
        model_id = _latest_done(project_dir)
        assert model_id is not None
        page.wait_for_selector(f".slideloop-models tr.active[data-model='{model_id}']", timeout=TIMEOUT)
        row = page.inner_text(f".slideloop-models tr[data-model='{model_id}']")
        assert TINY in row and "done" in row and "active" in row
        assert re.search(r"0\.\d{3}", row)  # the metric columns are filled
        page.wait_for_timeout(500)
        save_screenshot(page, tmp_path, "train-2-finished")
        # every "Start from" and encoder choice fits its dropdown (not cut to "model 1 (resnet1")
        texts = page.eval_on_selector_all(".slideloop-from option", "os => os.map(o => o.text)")
        assert any(t.replace("\xa0", " ").startswith(f"model {model_id} ") for t in texts), texts  # nbsp: ipywidgets
        for css in (".slideloop-from select", ".slideloop-encoder select"):
            text, padding, width = page.eval_on_selector(css, _FITS)
            assert text + padding <= width, (css, text, padding, width)

        # --- the queue re-ranked with the new model, the prediction overlay is drawn --------------------
        page.locator(".lm-TabBar-tab", has_text="Review").click()
        page.wait_for_function("() => document.querySelector('.slideloop-model').innerText.includes('lowest IoU')",
                               timeout=TIMEOUT)
        assert f"Model {model_id}" in page.inner_text(".slideloop-model")
        options = page.locator(".slideloop-queue select option").all_inner_texts()
        ious = [float(m.group(1)) for o in options if (m := re.search(r"\s(\d\.\d\d)\s+(?:\d\.\d\d|-)\s*$", o))]
        assert len(ious) >= 10, options[:5]
        assert ious[:10] == sorted(ious[:10])  # lowest IoU first
        page.wait_for_selector(f".slideloop-map img.leaflet-tile-loaded[src*='/slideloop/prediction/1/{model_id}/']",
                               timeout=TIMEOUT)
        page.wait_for_timeout(1000)
        save_screenshot(page, tmp_path, "train-3-reranked")
        assert outside_requests(requests) == []
    with Project.open(project_dir) as proj, proj.store.read() as s:
        job = s.scalars(select(JobRow).where(JobRow.kind == "train")).one()
        assert job.status == "done" and json.loads(job.result)["model_id"] == model_id
    assert srv.app_tracebacks() == []


def test_cancel_after_refresh_keeps_previous_model(with_model: tuple[Path, int], scheduler: str,
                                                   tmp_path: Path) -> None:
    """Start a long run from the last model, reload the page (a new kernel): the run is still shown; cancel
    it: the model that ranked the queue before stays active."""
    project, before = with_model
    assert _latest_done(project) == before
    with app_server(project, tmp_path / "srv") as srv, browser_page() as (page, requests):
        _open_train_tab(page, srv)
        # continue from the last model, as a reviewer would after corrections
        page.locator(".slideloop-from select").select_option(label=f"model {before} ({TINY})")
        # continuing fine-tunes at the recipe's lower rate: the box follows the choice
        page.wait_for_function("() => Number(document.querySelector('.slideloop-lr input').value) === 0.0001",
                               timeout=10_000)
        _set(page, "slideloop-epochs", "200")
        _set(page, "slideloop-batch", "2")
        page.click("button.slideloop-train")
        page.wait_for_function("() => /step \\d+\\//.test(document.querySelector('.slideloop-train-status').innerText)",
                               timeout=TIMEOUT)

        page.reload()
        _open_train_tab(page, srv)
        page.wait_for_function("() => /step \\d+\\//.test(document.querySelector('.slideloop-train-status').innerText)",
                               timeout=TIMEOUT)
        assert _progress(page) > 0
        assert page.locator("button.slideloop-train").is_disabled()
        save_screenshot(page, tmp_path, "train-4-after-refresh")
        page.click("button.slideloop-cancel")
        page.wait_for_function("() => document.querySelector('.slideloop-train-status').innerText.includes('cancelled')",
                               timeout=TIMEOUT)
        status = page.inner_text(".slideloop-train-status")
        assert f"model {before} stays active" in status
        assert page.locator(".slideloop-models tr.active").get_attribute("data-model") == str(before)
        assert page.locator("button.slideloop-train").is_enabled()
        page.wait_for_timeout(500)
        save_screenshot(page, tmp_path, "train-5-cancelled")
        assert outside_requests(requests) == []
        assert srv.app_tracebacks() == []  # the reload may log jupyter_server's own (see app_tracebacks)
    assert _latest_done(project) == before
    with Project.open(project) as proj, proj.store.read() as s:
        jobs = s.scalars(select(JobRow).where(JobRow.kind == "train")).all()
        assert [j.status for j in jobs] == ["cancelled"]
        newest = s.scalars(select(ModelRow).order_by(ModelRow.id.desc())).first()
        assert newest is not None and newest.id != before and newest.status == "cancelled"
        assert newest.parent_id == before and jobs[0].model_id == newest.id  # the job knows its model
        assert json.loads(newest.hparams)["peak_lr"] == pytest.approx(1e-4)


def test_failed_run_shows_its_error(generated_pyramid: Path, tmp_path: Path) -> None:
    """A crashed run (as the worker records it) is shown with its error; the previous model stays active."""
    with Project.create(tmp_path / "p") as proj:
        proj.add_slide(generated_pyramid)
        proj.build_grid(GridSpec(patch=256))
        with proj.store.write() as s:
            s.add(JobRow(kind="train", params=json.dumps({"options": {"epochs": 3}}), status="failed",
                         dask_key="slideloop-job-train-x", submitted=time.time() - 5, started=time.time() - 4,
                         finished=time.time(),
                         error="TrainingError: only one class (Background) is present\nTraceback (most recent...)"))
        state = AppState(proj)
        panel = TrainPanel(state, TrainingService(proj, connect=_no_cluster), poll=False)
        try:
            assert "failed: TrainingError: only one class (Background) is present" in panel.status.value
            assert "Traceback" not in panel.status.value
            assert "no model is active" in panel.status.value.lower()
            assert not panel.train_btn.disabled and panel.cancel_btn.disabled
            assert state.model_id is None
        finally:
            panel.close()


def test_settings_are_checked_before_queueing() -> None:
    with pytest.raises(ValueError, match="lr"):
        TrainSettings(lr=0).job_params()
    with pytest.raises(ValueError, match="at least 1"):
        TrainSettings(epochs=0).job_params()
    params = TrainSettings(from_model=3, encoder="resnet34").job_params()
    assert params["from_model"] == 3 and "encoder" not in params  # a continued model keeps its encoder
    assert TrainSettings().job_params()["encoder"] == "resnet18"


def test_the_panel_rates_are_the_recipe_s() -> None:
    from slideloop_apps.training import NEW_MODEL_LR, RETRAIN_LR

    from al_core.learn.recipe import get_recipe

    default = get_recipe("default")
    assert (NEW_MODEL_LR, RETRAIN_LR) == (default.base_lr(False), pytest.approx(default.base_lr(True)))


def _no_cluster():
    raise AssertionError("showing stored state must not need the cluster")


def test_rounds_and_object_metrics(with_model: tuple[Path, int], scheduler: str, tmp_path: Path) -> None:
    """A reviewer corrects three patches, retrains from the model in the panel: the Rounds table gains round 2
    with those three corrections and the change against round 1; object metrics of the active model appear on
    request."""
    from shapely.geometry import box

    project, before = with_model
    with Project.open(project) as proj:
        slide = proj.slides()[0]
        for pid in sorted(proj.labelled_patch_ids())[:3]:
            p = proj.patch(pid)
            proj.correct(slide.id, box(p.x, p.y, p.x + p.size / 2, p.y + p.size / 2), 1, patch_id=pid,
                         author="pathologist")
    with app_server(project, tmp_path / "srv") as srv, browser_page() as (page, requests):
        _open_train_tab(page, srv)
        page.wait_for_selector(".slideloop-rounds tr[data-round='1']", timeout=TIMEOUT)
        assert page.locator(".slideloop-rounds-table tr[data-round]").count() == 1
        first = page.locator(".slideloop-rounds tr[data-round='1'] td").all_inner_texts()
        assert first[:2] == ["1", str(before)] and first[3] == "0"  # round 1: no corrections before it
        assert "Since round 1: 3 patches corrected" in page.inner_text(".slideloop-rounds-pending")

        page.locator(".slideloop-from select").select_option(label=f"model {before} ({TINY})")
        _set(page, "slideloop-epochs", "1")
        _set(page, "slideloop-max-steps", "3")
        page.click("button.slideloop-train")
        deadline = time.monotonic() + 240
        while "finished" not in page.inner_text(".slideloop-train-status"):
            assert "failed" not in page.inner_text(".slideloop-train-status")
            assert time.monotonic() < deadline, page.inner_text(".slideloop-train-status")
            page.wait_for_timeout(300)
        page.wait_for_selector(".slideloop-rounds tr[data-round='2']", timeout=TIMEOUT)
        second = page.locator(".slideloop-rounds tr[data-round='2'] td").all_inner_texts()
        new_id = _latest_done(project)
        assert second[:2] == ["2", str(new_id)] and second[3] == "3"  # the three corrected patches
        assert re.fullmatch(r"0\.\d{3}", second[6]) and re.match(r"[▲▼=] [+-]\d\.\d{3}$", second[7]), second
        header = page.inner_text(".slideloop-rounds-table tr >> nth=0")
        assert "Epithelium IoU" in header and "Epithelium Dice" in header
        with Project.open(project) as proj:
            active = proj.models.active()
        assert active is not None
        assert page.locator(".slideloop-rounds tr.active").get_attribute("data-model") == str(active.id)
        page.wait_for_selector(".slideloop-slides-table th:has-text('round 2')", timeout=TIMEOUT)
        assert "Since round 2: 0 patches corrected" in page.inner_text(".slideloop-rounds-pending")

        page.click("button.slideloop-objects-btn")
        page.wait_for_selector(".slideloop-objects table", timeout=180_000)
        text = page.inner_text(".slideloop-objects")
        assert f"Model {active.id}" in text and "AJI" in text and "Epithelium" in text
        assert re.search(r"0\.\d{3} \[0\.\d{3}, [01]\.\d{3}\]", text), text  # mean [95 % interval]
        page.locator(".slideloop-rounds").scroll_into_view_if_needed()
        page.wait_for_timeout(300)
        save_screenshot(page, tmp_path, "train-6-rounds")
        assert outside_requests(requests) == []
        assert srv.app_tracebacks() == []
