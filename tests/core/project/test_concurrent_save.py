"""Two annotators' processes save corrections of one annotation at the same moment (each with its own
interpreter and connections, started together), on the project's SQLite file and on PostgreSQL: disjoint
boxes are both kept; an overlapping edit drawn on a version that changed meanwhile is refused, clearly.
Reviewer decisions survive a rebuilt grid."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
from shapely.geometry import Point, box

from al_core import GridSpec, Project

SLIDE = "CMU-1-Small-Region"
SAVE = textwrap.dedent("""
    import json, sys, time
    from shapely.geometry import box
    from al_core import Project
    from al_core.project.labels import LabelConflictError
    root, url, author, bounds, base, start = sys.argv[1:7]
    with Project.open(root, db_url=url or None) as proj:
        proj.label_version("{slide}")  # connections made and warm before the common start
        time.sleep(max(0.0, float(start) - time.time()))
        try:
            v = proj.correct("{slide}", box(*json.loads(bounds)), 2, author=author, base_version=int(base))
            print(json.dumps({{"version": v}}))
        except LabelConflictError as err:
            print(json.dumps({{"conflict": str(err)}}))
""").format(slide=SLIDE)


def _save_at_once(proj: Project, edits: dict[str, tuple[float, float, float, float]], base: int) -> dict[str, dict]:
    url = "" if proj.store.dialect == "sqlite" else proj.store.url
    start = time.time() + 4.0
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    procs = {a: subprocess.Popen([sys.executable, "-c", SAVE, str(proj.root), url, a, json.dumps(b), str(base),
                                  str(start)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for a, b in edits.items()}
    out = {}
    for a, p in procs.items():
        stdout, stderr = p.communicate(timeout=240)
        assert p.returncode == 0, stderr
        out[a] = json.loads(stdout.strip().splitlines()[-1])
    return out


def _class_in(proj: Project, bounds: tuple[float, float, float, float]) -> set[int]:
    region = box(*bounds)
    return {a.class_idx for a in proj.annotations(SLIDE) if a.geometry.intersection(region).area >= 0.99 * region.area}


def test_two_processes_save_disjoint_and_overlapping_edits(tmp_path, sample_svs, sample_geojson, db_url):
    with Project.create(tmp_path / "p", ["Epithelium:#c80000", "Stroma:#00a000"], db_url=db_url) as proj:
        proj.add_slide(sample_svs)
        proj.import_labels(sample_geojson)
        big = max((a.geometry for a in proj.annotations(SLIDE)), key=lambda g: g.area)
        x0, y0, x1, y1 = (int(v) for v in big.bounds)
        inside = [(x, y) for y in range(y0, y1, 50) for x in range(x0, x1, 50) if big.contains(Point(x, y))]
        (ax, ay), (bx, by) = inside[0], inside[-1]
        a, b = (ax - 40, ay - 40, ax + 40, ay + 40), (bx - 40, by - 40, bx + 40, by + 40)
        assert not box(*a).intersects(box(*b))
        # one annotation, two disjoint boxes, both drawn on version 1, saved at the same moment: both kept
        res = _save_at_once(proj, {"dr-a": a, "dr-b": b}, base=1)
        assert sorted(r["version"] for r in res.values()) == [2, 3]
        assert _class_in(proj, a) == {2} and _class_in(proj, b) == {2}
        assert sorted(h.author for h in proj.labels.history(1)[1:]) == ["dr-a", "dr-b"]
        # two overlapping boxes, both drawn on version 3: one goes in, the other is refused and names who
        c = (ax - 30, ay + 60, ax + 50, ay + 140)
        d = (ax - 10, ay + 80, ax + 70, ay + 160)
        res = _save_at_once(proj, {"dr-c": c, "dr-d": d}, base=3)
        won = [k for k, r in res.items() if "version" in r]
        lost = [k for k, r in res.items() if "conflict" in r]
        assert len(won) == 1 and len(lost) == 1 and res[won[0]]["version"] == 4
        assert f"changed by {won[0]} after you started (version 3)" in res[lost[0]]["conflict"]
        assert proj.label_version(SLIDE) == 4
        assert _class_in(proj, c if won == ["dr-c"] else d) == {2}


def test_reviewed_background_patches_stay_labelled_after_a_grid_rebuild(tmp_path, sample_svs, sample_geojson):
    """The issue's case: five background-only patches marked reviewed, the same grid rebuilt."""
    with Project.create(tmp_path / "p") as proj:
        proj.add_slide(sample_svs)
        proj.import_labels(sample_geojson)
        spec = GridSpec(patch=256, overlap=0, min_tissue=0.0)
        proj.build_grid(spec)
        background = [p for p in proj.patches() if p.id not in proj.labelled_patch_ids()][:5]
        assert len(background) == 5
        for p in background:
            proj.mark_reviewed(p.id, author="dr-a")
        labelled = proj.labelled_patch_ids()
        proj.build_grid(spec)
        again = proj.labelled_patch_ids()
        assert len(again) == len(labelled) and again.isdisjoint(labelled)  # new rows, the same regions
        regions = {(p.x, p.y) for p in proj.patches() if p.id in again}
        assert {(p.x, p.y) for p in background} <= regions
        assert np.all([proj.label_mask(p).max() == 0 for p in proj.patches() if (p.x, p.y) in
                       {(b.x, b.y) for b in background}])
