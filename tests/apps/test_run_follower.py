"""A run that finishes while the page is open re-ranks its queue whether or not the Train tab was ever opened
(the tab's panel is built on first opening, so a reviewer's first paint does not wait for it)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import ipywidgets as w
import pytest
from slideloop_apps.review import ReviewApp, build_app
from slideloop_apps.run_follower import RunFollower
from slideloop_apps.state import AppState
from slideloop_apps.train_panel import TrainPanel
from slideloop_apps.training import TrainingService

from al_core._constants import PROJECT_ENV
from al_core.project.project import Project
from al_core.project.schema import JobRow


def _no_cluster():
    raise AssertionError("following stored runs must not need the cluster")


def _finish_job(proj: Project, model_id: int) -> int:
    """A training job row as the worker leaves it when its run is done."""
    now = time.time()
    with proj.store.write() as s:
        row = JobRow(kind="train", params=json.dumps({"options": {"epochs": 1}}), status="done",
                     dask_key=f"slideloop-job-train-{now}", submitted=now - 3, started=now - 2, finished=now,
                     model_id=model_id, result=json.dumps({"model_id": model_id}))
        s.add(row)
        s.flush()
        return int(row.id)


def test_a_finished_run_reaches_the_queue_once(trained: tuple[Path, int], tmp_path: Path) -> None:
    root, model_id = trained
    shutil.copytree(root, tmp_path / "p")
    with Project.open(tmp_path / "p") as proj:
        state = AppState(proj)
        state.model_id = None  # the page opened before the model existed: nothing ranks its queue
        state.refresh_queue()
        assert not state.has_predictions
        follower = RunFollower(state, TrainingService(proj, connect=_no_cluster))
        follower.check()
        assert state.model_id is None  # no run finished yet

        job = _finish_job(proj, model_id)
        follower.check()
        assert state.model_id == model_id and state.has_predictions
        assert state.message == f"Job {job} finished: model {model_id} ranks the queue now."
        ious = [q.iou for q in state.queue if q.iou is not None]
        assert ious and ious[:5] == sorted(ious[:5])  # ranked by the new model: worst IoU first

        state.say("")  # handed over once: a later look leaves the reviewer's page alone
        follower.check()
        assert state.message == ""


def test_the_train_tab_is_built_when_first_opened(trained: tuple[Path, int], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    root, _ = trained
    shutil.copytree(root, tmp_path / "p")
    monkeypatch.setenv(PROJECT_ENV, str(tmp_path / "p"))
    tabs = build_app()
    panels: list[TrainPanel] = []
    try:
        assert isinstance(tabs, w.Tab) and tabs.titles == ("Review", "Train")
        review, train_tab = tabs.children
        assert isinstance(review, ReviewApp)
        assert not any(isinstance(c, TrainPanel) for c in train_tab.children)  # nothing built before the click
        tabs.selected_index = 1
        panels = [c for c in train_tab.children if isinstance(c, TrainPanel)]
        assert len(panels) == 1
        assert panels[0].follower.state is review.state  # the page's follower, not a second one
        tabs.selected_index = 0
        tabs.selected_index = 1
        assert train_tab.children == tuple(panels)  # opened again: the same panel
    finally:
        for p in panels:
            p.follower.stop()
            p.close()
        tabs.children[0].state.project.close()
