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
