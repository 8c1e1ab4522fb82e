"""A strategy study on a project whose labels are complete: how many corrections does each review rule need?

Per seed: a copy of the project keeps its labels on the test slides only as the held-out truth (they are erased
from the copy, so no model trains on them); every pool patch gets a pre-annotation made by corrupting its
labels (:mod:`.corrupt`) and counts as labelled. Round 0 trains on that. Then, per strategy, each round:
predict every patch → rank the pool patches not yet corrected → reveal the truth of the ``budget`` first ones
→ retrain from the last model (weights and optimizer state) → score the test slides. Strategies: ``iou``
(lowest prediction-vs-label IoU, the NoCodeSeg rule), ``entropy``, ``disagreement`` (TTA), ``mcdropout``,
``random``. The ``all labels`` reference trains once on the uncorrupted pool for as many steps as a strategy's
whole run. Test figures: mean IoU and Dice of the non-background classes, per patch → per slide → over slides.
Results: a table of every (strategy, seed, round), a summary with 95 % t-intervals over seeds, and a plot.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import torch

from al_core._io import atomic_write_bytes
from al_core.errors import ProjectError
from al_core.learn.checkpoint import load_model
from al_core.learn.corrupt import Corruption, corrupt, inner_box, mask_shapes
from al_core.learn.dataset import label_masks, open_cache
from al_core.learn.metrics import aggregate, confusion, split_slides
from al_core.learn.model import ModelConfig, config_for, preprocess
from al_core.learn.predict import predict
from al_core.learn.rank import IoURanker, RandomRanker, UncertaintyRanker, scores_frame
from al_core.learn.train import TrainOptions, train

if TYPE_CHECKING:
    from al_core.project.project import Project

STRATEGIES = ("iou", "entropy", "disagreement", "mcdropout", "random")
REFERENCE = "all labels"


@dataclass(frozen=True)
class SimulateSettings:
    """The study: strategies, seeds, rounds, corrections per round, the damage, the test slides, training."""

    strategies: tuple[str, ...] = ("iou", "entropy", "random")
    seeds: tuple[int, ...] = (0, 1, 2)
    rounds: int = 3
    budget: int = 8
    corruption: Corruption = Corruption()
    test_slides: tuple[str, ...] | None = None
    test_fraction: float = 0.2
    options: TrainOptions = TrainOptions()
    arch: dict[str, Any] = field(default_factory=dict)
    mc_samples: int = 8
    reference: bool = True

    def __post_init__(self) -> None:
        unknown = [s for s in self.strategies if s not in STRATEGIES]
        if unknown or not self.strategies:
            raise ValueError(f"unknown strategies {unknown} (choose from {', '.join(STRATEGIES)})")
        if self.rounds < 1 or self.budget < 1 or not self.seeds:
            raise ValueError("rounds and budget must be at least 1, and at least one seed is needed")


@dataclass
class _Truth:
    config: ModelConfig
    pool: dict[int, npt.NDArray[np.uint8]]  # pool patch id → true mask (model channels)
    test_slides: list[str]
    test_names: list[str]
    test_images: npt.NDArray[np.uint8]
    test_masks: npt.NDArray[np.uint8]


def simulate(project: Project, s: SimulateSettings, out_dir: str | Path,
             log: Callable[[str], None] = print) -> pd.DataFrame:
    """Run the study on ``project`` (left unchanged: every run works on a copy) and write ``simulate.csv``,
    ``simulate_summary.csv`` and ``simulate.png`` into ``out_dir``; returns the per-round table."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    truth = _truth(project, s)
    log(f"{len(truth.pool)} pool patches, {len(truth.test_names)} test patches on {', '.join(truth.test_slides)}")
    rows: list[dict[str, Any]] = []
    tmp = Path(tempfile.mkdtemp(prefix="slideloop-simulate-"))
    try:
        for seed in s.seeds:
            rows += _one_seed(project.root, tmp, truth, s, seed, log)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    table = pd.DataFrame(rows)
    summary = summarise(table)
    atomic_write_bytes(out / "simulate.csv", table.to_csv(index=False).encode())
    atomic_write_bytes(out / "simulate_summary.csv", summary.to_csv(index=False).encode())
    plot(summary, out / "simulate.png")
    return table


def _truth(project: Project, s: SimulateSettings) -> _Truth:
    spec = project.grid_spec()
    if spec is None:
        raise ProjectError(f"{project.root}: no patch grid yet; cut one before simulating")
    config = config_for(project.classes(), spec, **s.arch)
    patches = {p.id: p for p in project.patches()}
    labelled = sorted(project.labelled_patch_ids())
    slide_of = {sl.id: sl.name for sl in project.slides()}
    names = sorted({slide_of[patches[p].slide_id] for p in labelled})
    if len(names) < 2:
        raise ProjectError(f"{project.root}: a simulation needs labelled patches on at least two slides (pool and "
                           f"test); found {names}")
    _, test = split_slides(names, s.test_fraction, 0, list(s.test_slides) if s.test_slides else None)
    if not test or len(test) == len(names):
        raise ProjectError(f"{project.root}: the test slides {test} must leave at least one pool slide")
    masks = label_masks([patches[p] for p in labelled], project.labels.annotations, config)
    is_test = [slide_of[patches[p].slide_id] in test for p in labelled]
    test_ids = [p for p, t in zip(labelled, is_test, strict=True) if t]
    return _Truth(config, {p: m for p, m, t in zip(labelled, masks, is_test, strict=True) if not t}, test,
                  [slide_of[patches[p].slide_id] for p in test_ids], open_cache(project).get(test_ids),
                  masks[np.asarray(is_test)])


def _one_seed(root: Path, tmp: Path, truth: _Truth, s: SimulateSettings, seed: int,
              log: Callable[[str], None]) -> list[dict[str, Any]]:
    from al_core.project.project import Project

    base = tmp / f"seed-{seed}"
    shutil.copytree(root, base)
    opts = replace(s.options, seed=seed)
    with Project.open(base) as p:
        _erase_test(p, truth)
        rng = np.random.default_rng(seed)
        for pid in sorted(truth.pool):
            _write(p, pid, truth, rng, s.corruption)
        train(p, opts, **s.arch)
        r0 = _test_scores(p, truth)
    log(f"seed {seed}: round 0 (pre-annotation) test IoU {r0['test_iou']:.3f}")
    rows = [{"strategy": st, "seed": seed, "round": 0, "corrections": 0, **r0} for st in s.strategies]
    for st in s.strategies:
        work = tmp / f"seed-{seed}-{st}"
        shutil.copytree(base, work)
        with Project.open(work) as p:
            rows += _rounds(p, truth, s, opts, st, seed, log)
        shutil.rmtree(work, ignore_errors=True)
    if s.reference:
        with Project.open(base) as p:
            for pid in sorted(truth.pool):
                _write(p, pid, truth, None, s.corruption)
            steps = opts.max_steps * (s.rounds + 1) if opts.max_steps else None
            train(p, replace(opts, max_steps=steps, epochs=opts.epochs * (s.rounds + 1)), **s.arch)
            ref = _test_scores(p, truth)
        log(f"seed {seed}: {REFERENCE} test IoU {ref['test_iou']:.3f}")
        rows.append({"strategy": REFERENCE, "seed": seed, "round": s.rounds, "corrections": len(truth.pool), **ref})
    shutil.rmtree(base, ignore_errors=True)
    return rows


def _rounds(p: Project, truth: _Truth, s: SimulateSettings, opts: TrainOptions, strategy: str, seed: int,
            log: Callable[[str], None]) -> list[dict[str, Any]]:
    done: set[int] = set()
    rows = []
    for rnd in range(1, s.rounds + 1):
        res = predict(p, "latest", batch_size=16, tta=strategy == "disagreement",
                      mc_samples=s.mc_samples if strategy == "mcdropout" else 0)
        df = scores_frame(p, res.model_id)
        cand = df[df["patch_id"].isin(set(truth.pool) - done)]
        chosen = [int(i) for i in _rank(cand, strategy, seed * 1000 + rnd)["patch_id"].head(s.budget)]
        for pid in chosen:
            _write(p, pid, truth, None, s.corruption)
        done.update(chosen)
        train(p, opts, from_model="latest")
        sc = _test_scores(p, truth)
        rows.append({"strategy": strategy, "seed": seed, "round": rnd, "corrections": len(done), **sc})
        log(f"seed {seed} {strategy:12s} round {rnd}: {len(done):4d} corrected, test IoU {sc['test_iou']:.3f}")
    return rows


def _rank(cand: pd.DataFrame, strategy: str, seed: int) -> pd.DataFrame:
    if strategy == "iou":
        return IoURanker()(cand.assign(labelled=True))
    if strategy == "random":
        return RandomRanker(seed)(cand.assign(labelled=False))
    return UncertaintyRanker(strategy)(cand.assign(labelled=False))


def _erase_test(p: Project, truth: _Truth) -> None:
    from shapely.geometry import box

    for sl in p.slides():
        if sl.name in truth.test_slides:
            p.labels.edit(sl.id, box(0, 0, sl.width, sl.height), [], author="simulate", message="held out",
                          action="erase")


def _write(p: Project, pid: int, truth: _Truth, rng: np.random.Generator | None, c: Corruption) -> None:
    """Replace a pool patch's labels by its truth (``rng`` given: corrupted), marking the patch reviewed."""
    row = p.patch(pid)
    clip = inner_box(row.x, row.y, row.size)
    shapes = mask_shapes(truth.pool[pid], truth.config.class_idx, (row.x, row.y), row.downsample, clip)
    what = "reveal" if rng is None else "pre-annotation"
    if rng is not None:
        shapes = corrupt(shapes, c, rng, row.downsample, clip)
    p.labels.edit(row.slide_id, clip, shapes, author="simulate", message=what, action=what, patch=row)


def _test_scores(p: Project, truth: _Truth) -> dict[str, float]:
    net, config = load_model(p.models.checkpoint(p.models.resolve("latest")))
    cms = []
    with torch.inference_mode():
        for i in range(0, len(truth.test_images), 16):
            x = preprocess(torch.from_numpy(truth.test_images[i:i + 16]).permute(0, 3, 1, 2), config)
            pred = net(x).argmax(1).numpy()
            cms += [confusion(m, q, config.num_classes, config.ignore_index)
                    for m, q in zip(truth.test_masks[i:i + 16], pred, strict=True)]
    o = aggregate(truth.test_names, cms, config.class_names)["overall"]
    fg = list(config.class_names[1:])
    return {"test_iou": float(np.nanmean([o["iou"][n] for n in fg])),
            "test_dice": float(np.nanmean([o["dice"][n] for n in fg]))}


#: two-sided 95 % Student t quantiles by degrees of freedom (normal beyond)
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def summarise(table: pd.DataFrame) -> pd.DataFrame:
    """Mean and 95 % t-interval over seeds per (strategy, round) of corrections, test IoU and test Dice."""
    out = []
    for (st, rnd), g in table.groupby(["strategy", "round"], sort=False):
        row: dict[str, Any] = {"strategy": st, "round": rnd, "seeds": len(g), "corrections": g["corrections"].mean()}
        for col in ("test_iou", "test_dice"):
            v = g[col].to_numpy(dtype=np.float64)
            half = _T95.get(len(v) - 1, 1.96) * v.std(ddof=1) / math.sqrt(len(v)) if len(v) > 1 else math.nan
            row |= {col: v.mean(), f"{col}_low": v.mean() - half, f"{col}_high": v.mean() + half}
        out.append(row)
    return pd.DataFrame(out)


def corrections_to_reach(summary: pd.DataFrame, target: float) -> dict[str, float | None]:
    """Per strategy, the fewest mean corrections at which its mean test IoU reaches ``target`` (None: never)."""
    out: dict[str, float | None] = {}
    for st, g in summary[summary["strategy"] != REFERENCE].groupby("strategy", sort=False):
        hit = g[g["test_iou"] >= target].sort_values("corrections")
        out[str(st)] = float(hit["corrections"].iloc[0]) if len(hit) else None
    return out


def plot(summary: pd.DataFrame, path: Path) -> None:
    """Test IoU and Dice against corrections, one line and 95 % band per strategy (reference: dashed)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, col in zip(axes, ("test_iou", "test_dice"), strict=True):
        for st, g in summary.groupby("strategy", sort=False):
            if st == REFERENCE:
                ax.axhline(g[col].iloc[0], ls="--", c="grey", label=f"{REFERENCE} ({int(g['corrections'].iloc[0])})")
                continue
            g = g.sort_values("corrections")
            ax.plot(g["corrections"], g[col], marker="o", label=str(st))
            ax.fill_between(g["corrections"], g[f"{col}_low"], g[f"{col}_high"], alpha=0.2)
        ax.set_xlabel("patches corrected (truth revealed)")
        ax.set_ylabel(col.replace("_", " ") + " (non-background classes)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def strategies_arg(values: Sequence[str]) -> tuple[str, ...]:
    """The strategies as a tuple, checked (for the CLI)."""
    return tuple(SimulateSettings(strategies=tuple(values)).strategies)
