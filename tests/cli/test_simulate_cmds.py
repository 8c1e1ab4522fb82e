"""``slideloop simulate`` end to end through the CLI (a subprocess) on the bundled sample with a tiny model: two
slides (the SVS and its pyramid, both with the sample's labels), one held out for testing."""

from __future__ import annotations

import csv
import json

import pytest
from conftest import run_cli
from PIL import Image

from al_core.learn.corrupt import Corruption, corrupt, inner_box, mask_shapes
from al_core.learn.simulate import SimulateSettings, corrections_to_reach, summarise


@pytest.mark.slow
def test_cli_simulate_writes_table_summary_and_plot(tmp_path, sample_svs, sample_pyramid, sample_geojson):
    proj = str(tmp_path / "proj")
    run_cli("init", proj, "--classes", "Epithelium:#c80000")
    run_cli("add", proj, str(sample_svs))
    run_cli("add", proj, str(sample_pyramid), "--name", "pyramid")
    run_cli("grid", proj, "--patch", "128", "--overlap", "0")
    run_cli("labels", "import", proj, str(sample_geojson), "--slide", "CMU-1-Small-Region")
    run_cli("labels", "import", proj, str(sample_geojson), "--slide", "pyramid")
    out = tmp_path / "study"
    tiny = ["--encoder", "tu-mobilenetv3_small_050", "--encoder-depth", "3", "--decoder-channels", "16", "8", "8"]
    r = run_cli("simulate", proj, "--out", str(out), "--strategies", "iou", "mcdropout", "--seeds", "0",
                "1", "--rounds", "2", "--budget", "4", "--test-slides", "pyramid", "--max-steps", "2", "--epochs",
                "1", "--mc-samples", "2", *tiny, "--json")
    res = json.loads(r.stdout)
    with open(out / "simulate.csv") as fh:
        rows = list(csv.DictReader(fh))
    # 2 seeds × (2 strategies × (round 0 + 2 rounds) + the all-labels reference); random: see test_rank
    assert len(rows) == 2 * (2 * 3 + 1)
    for st in ("iou", "mcdropout"):
        corr = [int(float(x["corrections"])) for x in rows if x["strategy"] == st and x["seed"] == "0"]
        assert corr == [0, 4, 8]
    assert all(0.0 <= float(x["test_iou"]) <= 1.0 and 0.0 <= float(x["test_dice"]) <= 1.0 for x in rows)
    ref = [x for x in rows if x["strategy"] == "all labels"]
    assert len(ref) == 2 and int(ref[0]["corrections"]) > 8
    summary = {(s["strategy"], s["round"]): s for s in res["summary"]}
    s = summary[("iou", 2)]
    assert s["seeds"] == 2 and s["test_iou_low"] <= s["test_iou"] <= s["test_iou_high"]
    assert set(res["corrections_to_reference"]) == {"iou", "mcdropout"}
    with Image.open(out / "simulate.png") as im:
        assert im.format == "PNG" and im.size[0] > 300
    assert (out / "simulate_summary.csv").is_file()
    # the project itself is untouched: every run worked on a copy, so it still has no model
    r = run_cli("predict", proj, check=False)
    assert r.returncode == 2 and "no trained model yet" in r.stderr
    r = run_cli("simulate", proj, "--out", str(out), "--test-slides", "nope", check=False)
    assert r.returncode == 2 and "nope" in r.stderr


def test_corruption_is_seeded_and_changes_the_objects():
    import numpy as np

    mask = np.zeros((64, 64), np.uint8)
    for k in range(4):
        mask[5 + 14 * k:13 + 14 * k, 10:20] = 1
    clip = inner_box(0, 0, 64)
    shapes = mask_shapes(mask, (0, 1), (0, 0), 1.0, clip)
    assert len(shapes) == 4 and {c for c, _ in shapes} == {1}
    assert sum(g.area for _, g in shapes) == pytest.approx(mask.sum(), rel=1e-3)
    c = Corruption(drop=0.5, morph_px=1.0, shift_px=2.0)
    a = corrupt(shapes, c, np.random.default_rng(0), 1.0, clip)
    b = corrupt(shapes, c, np.random.default_rng(0), 1.0, clip)
    assert [g.wkt for _, g in a] == [g.wkt for _, g in b]
    assert not any(g.equals(h) for (_, g), (_, h) in zip(a, shapes, strict=False))  # moved and resized
    assert any(len(corrupt(shapes, c, np.random.default_rng(s), 1.0, clip)) < 4 for s in range(10))
    same = corrupt(shapes, Corruption(0, 0, 0), np.random.default_rng(1), 1.0, clip)
    assert len(same) == 4 and all(g.equals(h) for (_, g), (_, h) in zip(same, shapes, strict=True))
    assert corrupt(shapes, Corruption(drop=1.0), np.random.default_rng(1), 1.0, clip) == []
    with pytest.raises(ValueError):
        Corruption(drop=2.0)
    with pytest.raises(ValueError, match="unknown strategies"):
        SimulateSettings(strategies=("best",))


def test_summary_intervals_and_corrections_to_reach():
    import pandas as pd

    t = pd.DataFrame([{"strategy": "iou", "seed": s, "round": r, "corrections": 4 * r,
                       "test_iou": 0.5 + 0.1 * r + 0.01 * s, "test_dice": 0.6} for s in (0, 1, 2) for r in (0, 1, 2)]
                     + [{"strategy": "all labels", "seed": s, "round": 2, "corrections": 40, "test_iou": 0.65,
                         "test_dice": 0.7} for s in (0, 1, 2)])
    sm = summarise(t)
    row = sm[(sm["strategy"] == "iou") & (sm["round"] == 1)].iloc[0]
    # mean 0.61, sd 0.01, n 3: half-width 4.303 · 0.01 / √3
    assert row["test_iou"] == pytest.approx(0.61)
    assert row["test_iou_high"] - row["test_iou"] == pytest.approx(4.303 * 0.01 / 3 ** 0.5)
    assert corrections_to_reach(sm, 0.65) == {"iou": 8.0}
    assert corrections_to_reach(sm, 0.9) == {"iou": None}
