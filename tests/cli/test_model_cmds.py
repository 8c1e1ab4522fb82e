"""The model commands (train, predict, rank, metrics) end to end through the installed CLI (subprocesses), as a
user runs them on the bundled sample."""

from __future__ import annotations

import csv
import json

import pytest
from conftest import run_cli


@pytest.mark.slow
def test_cli_train_predict_rank_metrics(tmp_path, sample_svs, sample_geojson):
    proj = str(tmp_path / "proj")
    run_cli("init", proj, "--classes", "Epithelium:#c80000")
    run_cli("add", proj, str(sample_svs))
    run_cli("grid", proj, "--patch", "128", "--overlap", "0")
    # errors are one line on stderr, exit status 2
    r = run_cli("train", proj, "--max-steps", "1", check=False)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert "slideloop train: error:" in r.stderr and "no labelled patches" in r.stderr
    r = run_cli("predict", proj, check=False)
    assert r.returncode == 2 and "no trained model yet" in r.stderr
    # the core says what is missing; the CLI adds what to type next
    assert "(train one with 'slideloop train PROJECT'" in r.stderr and r.stderr.strip().count("\n") == 0
    run_cli("labels", "import", proj, str(sample_geojson))
    tiny = ["--encoder", "tu-mobilenetv3_small_050", "--encoder-depth", "3", "--decoder-channels", "16", "8", "8"]
    out = json.loads(run_cli("train", proj, *tiny, "--epochs", "1", "--max-steps", "2", "--lr", "1e-3",
                             "--json").stdout)
    assert out["status"] == "done" and out["model_id"] == 1 and len(out["history"]) == 1
    pred = json.loads(run_cli("predict", proj, "--json").stdout)
    assert pred["model_id"] == 1 and pred["patches"] == 46 and pred["labelled"] == 41
    rank = json.loads(run_cli("rank", proj, "--json", "--count", "5", "--csv", str(tmp_path / "q.csv")).stdout)
    ious = [r["iou"] for r in rank["queue"]]
    assert rank["by"] == "iou" and rank["model_id"] == 1 and len(ious) == 5 and ious == sorted(ious)
    with open(tmp_path / "q.csv") as fh:
        assert [int(r["patch_id"]) for r in csv.DictReader(fh)] == [r["patch_id"] for r in rank["queue"]]
    unl = json.loads(run_cli("rank", proj, "--unlabelled", "--fraction", "1", "--json").stdout)["queue"]
    assert len(unl) == 5 and not any(r["labelled"] for r in unl)
    m = json.loads(run_cli("metrics", proj, "--json").stdout)
    assert m["model_id"] == 1 and m["all"]["patches"] == 41 and m["test"] is None
    assert set(m["all"]["overall"]["dice"]) == {"Background", "Epithelium"}
    # incremental: continue from the latest model
    out2 = json.loads(run_cli("train", proj, "--from", "latest", "--epochs", "1", "--max-steps", "1",
                              "--json").stdout)
    assert out2["model_id"] == 2 and out2["status"] == "done"
    text = run_cli("metrics", proj, "--model", "1").stdout
    assert "macro_iou" in text and "dice_Epithelium" in text


def test_train_without_a_grid_hints_at_the_grid_command(tmp_path):
    proj = str(tmp_path / "proj")
    run_cli("init", proj)
    r = run_cli("train", proj, "--max-steps", "1", check=False)
    assert r.returncode == 2 and "no patch grid yet" in r.stderr
    assert "(cut the patch grid with 'slideloop grid PROJECT')" in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
