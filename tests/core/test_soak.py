"""The loop keeps its promises over three rounds on the bundled sample (tiny model): correct → train → promote
or keep back → predict → export → infer, with the invariants checked after every round:

- the class map is made at the training µm/px and agrees with the stored prediction of the same model on the
  same patches (≥ 0.99 of pixels);
- the active model is never worse on the fixed validation set than the one it replaced, unless a user chose it;
- every saved correction is in the latest label version.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from _engine import TINY, make_project
from shapely.geometry import box

import al_core
from al_core.learn.train import TrainOptions
from al_core.project.project import Project

#: round 2 trains a fresh model with a learning rate that cannot learn: it must be kept back
ROUNDS = (TrainOptions(epochs=1, max_steps=12, lr=3e-3, val_fraction=0.2, seed=0),
          TrainOptions(epochs=1, max_steps=1, lr=1e-7, val_fraction=0.2, seed=1),
          TrainOptions(epochs=1, max_steps=12, lr=1e-3, val_fraction=0.2, seed=2))


def _correct_worst(proj: Project, done: set[tuple[int, int]], round_no: int) -> list[tuple[int, tuple[int, ...], int]]:
    """Paint a box in each of the two worst patches not corrected before; returns (slide, box, class)."""
    if round_no == 0:
        patches = [p for p in proj.patches() if p.id in proj.labelled_patch_ids()]
    else:
        q = proj.review_queue(count=50)
        by_id = {p.id: p for p in proj.patches()}
        patches = [by_id[int(i)] for i in q.patch_id]
    out = []
    for p, cls in zip([p for p in patches if (p.x, p.y) not in done][:2], (1, 0), strict=False):
        done.add((p.x, p.y))  # one paints Epithelium, the other erases to background
        b = (p.x + p.size // 4, p.y + p.size // 4, p.x + p.size // 2, p.y + p.size // 2)
        proj.correct(p.slide_id, box(*b), cls or None, author=f"round{round_no}", patch_id=p.id,
                     base_version=proj.label_version(p.slide_id))
        out.append((p.slide_id, b, cls))
    return out


def _agreement(proj: Project, model_id: int, class_map: np.ndarray) -> float:
    """Share of model pixels where the inferred class map equals the stored prediction, over every patch."""
    same = total = 0
    h0, w0 = class_map.shape
    for p in proj.patches():
        stored = proj.predictions.classes(model_id, p.id)
        n = stored.shape[0]
        centres = (np.arange(n) + 0.5) * p.size / n
        rows = np.clip((p.y + centres).astype(int), 0, h0 - 1)
        cols = np.clip((p.x + centres).astype(int), 0, w0 - 1)
        inside = ((p.y + centres) < h0)[:, None] & ((p.x + centres) < w0)[None, :]  # padding is not the map
        same += int((class_map[np.ix_(rows, cols)] == stored)[inside].sum())
        total += int(inside.sum())
    return same / total


@pytest.mark.slow
def test_three_rounds_keep_the_promises(tmp_path: Path, sample_svs: Path, sample_geojson: Path) -> None:
    root = tmp_path / "proj"
    saved: list[tuple[int, tuple[int, ...], int]] = []
    corrected: set[tuple[int, int]] = set()
    with make_project(root, sample_svs, sample_geojson) as proj:
        spec = proj.grid_spec()
        assert spec is not None and spec.target_mpp == 1.0
        for k, opts in enumerate(ROUNDS):
            saved += _correct_worst(proj, corrected, k)
            before = proj.models.active()
            fresh = before is None or k == 1
            res = proj.train(opts, from_model=None if fresh else "active", **(TINY if fresh else {}))
            assert res.status == "done" and res.scale == {"mpp": 1.0, "downsample": None, "calibrated": True}
            ev = res.evaluation
            active = proj.models.active()
            # promotion on evidence: the active model is the new one exactly when it was not worse
            assert ev is not None and active is not None
            assert (active.id == res.model_id) == ev["promoted"]
            if before is not None:
                assert ev["active_id"] == before.id and ev["active_score"] is not None
                assert ev["promoted"] == (ev["score"] >= ev["active_score"] - ev["tolerance"])
            if k == 1:
                assert not ev["promoted"]  # the round that could not learn was kept back
            rec = proj.models.active_record()
            assert rec is not None and rec["chosen"] is False
            # predict → export → infer with the active model
            proj.predict(factor=1, precision="fp32", batch_size=16)
            onnx = tmp_path / f"round{k}.onnx"
            exported = proj.export(onnx)
            assert exported.model_id == active.id and exported.config.target_mpp == 1.0
            out = tmp_path / f"round{k}.tiff"
            rep = al_core.infer(onnx, sample_svs, out, min_tissue=0.0, mask_tissue=False, geojson=False)
            assert rep.model_mpp == pytest.approx(res.scale["mpp"])  # the class map at the training µm/px
            assert rep.model_scale["mpp"] == 1.0
            class_map = tifffile.imread(out)
            assert class_map.shape == (rep.dimensions[1], rep.dimensions[0])
            assert _agreement(proj, active.id, class_map) >= 0.99
            # every saved correction is in the latest label version
            for slide_id, b, cls in saved:
                region = box(*b)
                covering = [a for a in proj.annotations(slide_id) if a.geometry.intersects(region)]
                painted = sum(a.geometry.intersection(region).area for a in covering if a.class_idx == cls)
                if cls == 0:
                    assert sum(a.geometry.intersection(region).area for a in covering) < 1e-6 * region.area
                else:
                    assert painted >= 0.999 * region.area
        # the fixed validation set only grew, and each version recorded its patches
        regions = [json.loads(m.patches)["val_regions"] for m in proj.models.list()]
        for a, b in zip(regions, regions[1:], strict=False):
            assert {tuple(r) for r in a} <= {tuple(r) for r in b}
