"""The app's model choice against a real project (widgets in the kernel, no browser): a retrain that scored
worse is shown kept back beside the active model with "Use it anyway"; the Review tab's picker switches the
ranking model to any version and back, and the choice is the project's active model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _engine import TINY, clone
from slideloop_apps.model_choice import KeptBack, ModelSwitcher
from slideloop_apps.state import AppState

from al_core.learn.predict import predict
from al_core.learn.train import TrainOptions, train


@pytest.mark.slow
def test_kept_back_model_and_switching(trained: tuple[Path, int], tmp_path: Path) -> None:
    src, first = trained
    proj = clone(src, tmp_path / "proj")
    with proj:
        res = train(proj, TrainOptions(epochs=1, max_steps=1, lr=1e-7, val_fraction=0.1, seed=0), **TINY)
        second = res.model_id
        assert res.evaluation is not None and res.evaluation["promoted"] is False
        predict(proj, second, batch_size=16)
        state = AppState(proj, author="ana")
        assert state.model_id == first  # the active model ranks the queue, not the newest
        kept = KeptBack(state)
        switch = ModelSwitcher(state)
        assert kept.layout.display != "none"
        assert f"Model {second} was kept back" in kept.table.value and "worse than" in kept.table.value
        assert f"model {first} (active)" in kept.table.value
        labels = dict((v, k) for k, v in switch.picker.options)
        assert "active" in labels[first] and "kept back" in labels[second] and switch.picker.value == first
        kept.use_btn.click()  # use it anyway
        assert proj.models.active().id == second == state.model_id
        assert proj.models.active_record()["chosen"] is True and proj.models.active_record()["by"] == "ana"
        assert kept.layout.display == "none" and switch.picker.value == second
        switch.picker.value = first  # and back, from the Review tab
        assert proj.models.active().id == first == state.model_id
        assert json.loads(proj.store.get_meta("active_history"))[-1]["id"] == first
