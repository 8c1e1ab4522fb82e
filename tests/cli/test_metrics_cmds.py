"""``slideloop metrics --objects`` / ``--by-tag`` and ``slideloop tag`` through the CLI (subprocesses), on a copy of
the session's tiny trained sample project."""

from __future__ import annotations

import json

import pytest
from _engine import clone
from conftest import run_cli


def test_cli_object_metrics_and_tags(trained, tmp_path):
    root, mid = trained
    clone(root, tmp_path / "p").close()
    proj = str(tmp_path / "p")
    obj = json.loads(run_cli("metrics", proj, "--objects", "Epithelium", "--json").stdout)["objects"]
    o = obj["classes"]["Epithelium"]["overall"]
    assert obj["model_id"] == mid and o["patches"] >= 1 and 0 <= o["aji"]["low"] <= o["aji"]["high"] <= 1
    text = run_cli("metrics", proj, "--objects").stdout
    assert "object metrics" in text and "aji" in text and "(over slides)" in text
    r = run_cli("metrics", proj, "--objects", "Nucleus", check=False)
    assert r.returncode == 2 and "no class 'Nucleus'" in r.stderr
    tagged = json.loads(run_cli("tag", proj, "CMU-1-Small-Region", "stain=HE", "--json").stdout)
    assert tagged == {"slide": "CMU-1-Small-Region", "tags": {"stain": "HE"}}
    m = json.loads(run_cli("metrics", proj, "--by-tag", "stain", "--json").stdout)
    by = m["by_tag"]
    assert by["key"] == "stain" and by["groups"]["HE"]["slides"] == ["CMU-1-Small-Region"]
    assert by["groups"]["HE"]["macro_iou"] == pytest.approx(m["all"]["overall"]["macro_iou"])
    assert "by tag 'stain'" in run_cli("metrics", proj, "--by-tag", "stain").stdout
    r = run_cli("tag", proj, "nope", "stain=HE", check=False)
    assert r.returncode == 2 and "no slide 'nope'" in r.stderr


def test_cli_rounds(trained, tmp_path):
    """Two rounds: the session's model, two patches corrected, a model continued from it through the CLI."""
    from shapely.geometry import box

    root, mid = trained
    with clone(root, tmp_path / "p") as p:
        slide = p.slides()[0]
        for pid in sorted(p.labelled_patch_ids())[:2]:
            q = p.patch(pid)
            p.correct(slide.id, box(q.x, q.y, q.x + q.size / 2, q.y + q.size / 2), 1, patch_id=pid, author="t")
    proj = str(tmp_path / "p")
    first = json.loads(run_cli("rounds", proj, "--json").stdout)
    assert [(r["round"], r["model_id"], r["corrections"]) for r in first["rounds"]] == [(1, mid, 0)]
    assert first["pending_corrections"] == 2
    run_cli("train", proj, "--from", "latest", "--epochs", "1", "--max-steps", "2", "--json")
    rounds = json.loads(run_cli("rounds", proj, "--json").stdout)["rounds"]
    assert [(r["round"], r["corrections"], r["parent_id"]) for r in rounds] == [(1, 0, None), (2, 2, mid)]
    r2 = rounds[1]
    assert r2["delta_iou"] == pytest.approx(r2["mean_iou"] - rounds[0]["mean_iou"])
    assert set(r2["val_iou"]) == {"Background", "Epithelium"} and r2["slide_iou"] == {}
    text = run_cli("rounds", proj, "--by-slide").stdout
    lines = text.splitlines()
    assert "corrections" in lines[1] and "iou_Epithelium" in lines[1]
    assert lines[3].split()[:2] == ["1", str(mid)] and f"{r2['delta_iou']:+.3f}" in lines[4]
    assert "macro IoU per slide" in text and "CMU-1-Small-Region" in text
    assert "since round 2: 0 patch(es) corrected" in text
    r = run_cli("rounds", str(tmp_path / "nope"), check=False)
    assert r.returncode == 2 and "not a slideloop project" in r.stderr
