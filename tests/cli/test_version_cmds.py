"""An active model chosen on evidence, as a user meets it from the CLI: a worse retrain is kept back (both
scored on the same validation patches), predict/rank/export default to the active model, `models activate`
switches to any version and back."""

from __future__ import annotations

import json

import pytest
from _engine import clone
from conftest import run_cli

from al_core.project.project import Project

WORSE = ["--encoder", "tu-mobilenetv3_small_050", "--encoder-depth", "3", "--decoder-channels", "32", "16", "8",
         "--epochs", "1", "--max-steps", "1", "--lr", "1e-7", "--val-fraction", "0.1"]


@pytest.mark.slow
def test_worse_model_is_kept_back_and_the_user_can_switch(trained, tmp_path):
    src, first = trained
    clone(src, tmp_path / "proj").close()
    root = tmp_path / "proj"
    with Project.open(root) as proj:
        assert proj.models.active().id == first  # the first model was promoted (no active one before)
        ev1 = json.loads(proj.models.get(first).metrics)["evaluation"]
        assert ev1["promoted"] and ev1["active_id"] is None and ev1["patches"] > 0
    res = json.loads(run_cli("train", str(root), *WORSE, "--json").stdout)
    ev = res["evaluation"]
    second = res["model_id"]
    assert ev["promoted"] is False and ev["active_id"] == first
    # like with like: the active model re-scored on the same set gives its own earlier figure
    assert ev["patches"] == ev1["patches"] and ev["active_score"] == pytest.approx(ev1["score"], abs=1e-6)
    assert ev["score"] < ev["active_score"] - ev["tolerance"] and "worse than" in ev["reason"]
    rows = {r["id"]: r for r in json.loads(run_cli("models", "list", str(root), "--json").stdout)}
    assert rows[first]["active"] and not rows[second]["active"] and rows[second]["decision"] == "kept back"
    listed = run_cli("models", "list", str(root)).stdout
    assert "kept back" in listed and "1 µm/px" in listed
    # predict, rank and export follow the active model, not the newest
    assert json.loads(run_cli("predict", str(root), "--json").stdout)["model_id"] == first
    assert json.loads(run_cli("rank", str(root), "--json").stdout)["model_id"] == first
    out = json.loads(run_cli("export", str(root), "-o", str(tmp_path / "m.onnx"), "--json").stdout)
    assert out["model_version"] == str(first)
    # use it anyway, then back
    run_cli("models", "activate", str(root), str(second), "--author", "ana")
    assert json.loads(run_cli("predict", str(root), "--json").stdout)["model_id"] == second
    assert json.loads(run_cli("rank", str(root), "--json").stdout)["model_id"] == second
    with Project.open(root) as proj:
        rec = proj.models.active_record()
        assert rec["id"] == second and rec["chosen"] is True and rec["by"] == "ana"
    run_cli("models", "activate", str(root), str(first))
    assert json.loads(run_cli("rank", str(root), "--json").stdout)["model_id"] == first
    bad = run_cli("models", "activate", str(root), "99", check=False)
    assert bad.returncode == 2 and "no model 99" in bad.stderr
    run_cli("models", "tolerance", str(root), "0.5")
    assert json.loads(run_cli("models", "tolerance", str(root), "--json").stdout) == {"tolerance": 0.5}
