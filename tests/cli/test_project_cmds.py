"""The project commands (init, add, grid, labels, status) as a user runs them: a subprocess per command on the
bundled sample; errors are one line."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli, tissue_image


def test_cli_end_to_end_on_sample(tmp_path, sample_svs, sample_pyramid, sample_geojson):
    proj = tmp_path / "proj"
    run_cli("init", str(proj), "--classes", "Epithelium:#c80000")
    out = run_cli("add", str(proj), str(sample_svs), "--json")
    assert json.loads(out.stdout)[0]["name"] == "CMU-1-Small-Region"
    run_cli("add", str(proj), str(sample_pyramid), "--name", "pyr")
    grid = json.loads(run_cli("grid", str(proj), "--patch", "256", "--json").stdout)
    assert grid["spec"]["patch"] == 256 and all(s["patches"] > 0 for s in grid["slides"])
    imp = run_cli("labels", "import", str(proj), str(sample_geojson))
    assert "label version 1" in imp.stdout
    pre = json.loads(run_cli("labels", "preannotate", str(proj), "--json").stdout)
    assert [r["slide"] for r in pre] == ["pyr"] and 0.05 < pre[0]["area_fraction"] < 0.4
    st = json.loads(run_cli("status", str(proj), "--json").stdout)
    assert st["totals"]["slides"] == 2 and st["totals"]["labelled"] > 0
    assert st["totals"]["labelled"] + st["totals"]["unlabelled"] == st["totals"]["patches"]
    text = run_cli("status", str(proj)).stdout
    assert "CMU-1-Small-Region" in text and "labelled" in text
    exported = tmp_path / "out.geojson"
    run_cli("labels", "export", str(proj), "-o", str(exported), "--slide", "pyr")
    assert json.loads(exported.read_text())["type"] == "FeatureCollection"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["status", "{tmp}/nowhere"], "not a slideloop project"),
        (["add", "{proj}", "{tmp}/missing.svs"], "missing.svs: file not found"),
        (["add", "{proj}", "{tmp}/notes.txt"], "notes.txt: unsupported file type .txt"),
        (["labels", "import", "{proj}", "{tmp}/broken.geojson"], "broken.geojson: not valid JSON"),
        (["grid", "{proj}", "--overlap", "600"], "overlap must be in"),
        (["init", "{tmp}/x", "--classes", "Tumor"], "expected NAME:#RRGGBB"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, args, message):
    proj = tmp_path / "proj"
    run_cli("init", str(proj))
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "broken.geojson").write_text("{")
    argv = [a.format(tmp=tmp_path, proj=proj) for a in args]
    res = run_cli(*argv, check=False)
    assert res.returncode == 2
    assert message in res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_grid_overlap_defaults_to_a_quarter_of_the_patch(tmp_path, sample_svs):
    proj = tmp_path / "proj"
    run_cli("init", str(proj))
    run_cli("add", str(proj), str(sample_svs))
    grid = json.loads(run_cli("grid", str(proj), "--patch", "128", "--json").stdout)
    assert grid["spec"]["patch"] == 128 and grid["spec"]["overlap"] == 32
    text = run_cli("grid", str(proj), "--patch", "256", "--overlap", "0").stdout
    assert "patches of 256 px, overlap 0" in text
    st = json.loads(run_cli("status", str(proj), "--json").stdout)
    assert st["grid"]["overlap"] == 0 and st["grid"]["patch"] == 256


def test_slide_without_mpp_gets_the_cli_hint(tmp_path):
    from PIL import Image

    proj = tmp_path / "proj"
    run_cli("init", str(proj))
    png = tmp_path / "tile.png"
    Image.fromarray(tissue_image(600, 400)).save(png)
    run_cli("add", str(proj), str(png))
    res = run_cli("grid", str(proj), "--patch", "64", "--target-mpp", "2", check=False)
    assert res.returncode == 2 and "tile: has no µm/px metadata (uncalibrated)" in res.stderr
    assert "grid it with --downsample N" in res.stderr and "add the slide again with --mpp" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    # a downsample needs no scale; --mpp on add gives one
    run_cli("grid", str(proj), "--patch", "64", "--downsample", "2")
    run_cli("add", str(proj), str(png), "--name", "scaled", "--mpp", "0.5")
    st = json.loads(run_cli("status", str(proj), "--json").stdout)
    assert [s["mpp"] for s in st["slides"]] == [None, 0.5]


def test_version_and_help():
    from al_core import __version__

    assert run_cli("--version").stdout.strip() == f"slideloop {__version__}"
    helptext = run_cli("--help").stdout
    for cmd in ("init", "add", "grid", "labels", "status"):
        assert cmd in helptext


def test_every_subcommand_and_option_has_help():
    import argparse

    from al_core.cli import build_parser

    missing: list[str] = []

    def walk(parser: argparse.ArgumentParser, path: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                helps = {c.dest: c.help for c in action._choices_actions}
                for name, sub in action.choices.items():
                    if not helps.get(name):
                        missing.append(f"{path} {name}")
                    walk(sub, f"{path} {name}")
            elif not action.help and not isinstance(action, argparse._HelpAction):
                missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")

    walk(build_parser(), "slideloop")
    assert missing == []
