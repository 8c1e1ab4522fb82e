"""Simulated-reviewer active-learning evaluation on MoNuSeg (H&E nuclei), through the real slideloop engine.

Setting (NoCodeSeg's refinement loop): the pool images are slides of a project whose patches all carry a
*pre-annotation* — the ground truth with a random share (0–80 %, drawn per patch) of its nuclei missing, as a
hasty annotator or a weak earlier model would leave it. Round 0 trains on those labels. Each round then:
predict every pool patch → rank → the "reviewer" corrects the selected patches (their ground truth is
revealed) → retrain from the last checkpoint (``--from latest``: weights + Adam state). Selection rules, same
budget per round: ``iou`` (lowest prediction-vs-label IoU, the NoCodeSeg rule), ``entropy`` (most uncertain
not-yet-reviewed patches) and ``random``. Test IoU/Dice (binary, nucleus class) is measured on held-out
images, split by image, never seen in training.

Data: ``../shared/data/seg/monuseg`` beside the repository (research-use terms: read in place, never copied into
the repository; the script skips cleanly when it is absent; ``--data`` points elsewhere). Reference: InstantDL reports a median Jaccard of 0.57 for
semantic segmentation of this nuclei set with a U-Net.

    python bench/al_eval_monuseg.py                       # small CPU setting (minutes)
    python bench/al_eval_monuseg.py --steps 200 --rounds 5 --encoder resnet34 --downsample 1   # GPU scale
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from rasterio import features
from shapely import affinity
from shapely.geometry import box, shape

from al_core.learn.checkpoint import load_model
from al_core.learn.metrics import aggregate, confusion
from al_core.learn.model import preprocess
from al_core.learn.predict import predict
from al_core.learn.rank import IoURanker, RandomRanker, UncertaintyRanker, scores_frame
from al_core.learn.train import TrainOptions, train
from al_core.project.project import Project
from al_core.wsi.grid import GridSpec

#: the shared data folder beside the repository (``<repo>/../shared/data``), as the other benchmarks find it
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DATA = SHARED_DATA / "seg" / "monuseg"
INSTANTDL_MEDIAN_JACCARD = 0.57


def load_set(root: Path) -> list[tuple[str, Path, np.ndarray]]:
    rows = list(csv.DictReader(open(root / "manifest.csv")))
    out = []
    for r in sorted(rows, key=lambda r: r["image"]):
        if r["split"] != "train":
            continue
        mask = np.asarray(Image.open(root / r["mask"])) > 0
        out.append((Path(r["image"]).stem, root / r["image"], mask))
    return out


def polygons(mask: np.ndarray, x0: int, y0: int, clip: box) -> list:
    """Nucleus polygons of a binary mask crop, in level-0 coordinates, clipped to ``clip``."""
    geoms = []
    for geom, val in features.shapes(mask.astype(np.uint8), mask=mask.astype(bool)):
        if val:
            g = shape(geom)
            g = g if g.is_valid else g.buffer(0)
            g = affinity.translate(g, x0, y0).intersection(clip)
            if not g.is_empty and g.area > 0:
                geoms.append(g)
    return geoms


def label_patch(proj: Project, patch, gt: np.ndarray, rng: np.random.Generator | None, author: str) -> None:
    """Replace a patch's labels by its ground truth (``rng`` given: with a random share of nuclei dropped)."""
    x, y, s = patch.x, patch.y, patch.size
    # a hair inside the patch, so a label never touches (and so "labels") the neighbouring patch
    clip = box(x + 1e-3, y + 1e-3, x + s - 1e-3, y + s - 1e-3)
    geoms = polygons(gt[y:y + s, x:x + s], x, y, clip)
    if rng is not None and geoms:
        drop = rng.uniform(0.0, 0.8)
        geoms = [g for g in geoms if rng.random() >= drop]
    # one version: whatever lay inside the patch is replaced, and the patch counts as reviewed (labelled)
    what = "reveal" if rng is None else "pre-annotation"
    proj.labels.edit(patch.slide_id, clip, [(1, g) for g in geoms], author=author, message=what, action=what,
                     patch=patch)


def test_scores(proj: Project, test: list[tuple[str, Path, np.ndarray]], downsample: float) -> dict:
    """Binary nucleus IoU/Dice on whole held-out images (read at the grid's downsample), per image → mean."""
    model, cfg = load_model(proj.models.checkpoint(proj.models.resolve("latest")))
    model = model.to(memory_format=torch.channels_last)
    names, cms = [], []
    for name, img_path, gt in test:
        img = Image.open(img_path).convert("RGB")
        w, h = img.size
        tw, th = round(w / downsample), round(h / downsample)
        arr = np.asarray(img.resize((tw, th), Image.BILINEAR))
        lab = np.asarray(Image.fromarray(gt.astype(np.uint8)).resize((tw, th), Image.NEAREST))
        m = 2 ** cfg.encoder_depth
        ph, pw = (-th) % m, (-tw) % m
        x = torch.from_numpy(np.pad(arr, ((0, ph), (0, pw), (0, 0)), mode="reflect")).permute(2, 0, 1)[None]
        with torch.inference_mode():
            pred = model(preprocess(x, cfg).contiguous(memory_format=torch.channels_last)).argmax(1)[0, :th, :tw]
        names.append(name)
        cms.append(confusion(lab, pred.numpy(), 2))
    agg = aggregate(names, cms, ["background", "nucleus"])["overall"]
    jacc = [float(cm[1, 1] / max(1, cm[1, 1] + cm[0, 1] + cm[1, 0])) for cm in cms]
    return {"iou": agg["iou"]["nucleus"], "dice": agg["dice"]["nucleus"], "median_jaccard": float(np.median(jacc)),
            "macro_iou": agg["macro_iou"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--train-images", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--budget", type=int, default=24, help="patches reviewed per round")
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps in round 0 and per later round")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--patch", type=int, default=128)
    ap.add_argument("--downsample", type=float, default=2.0)
    ap.add_argument("--encoder", default="tu-mobilenetv3_small_100")
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--strategies", nargs="+", default=["iou", "entropy", "random"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("al_eval_monuseg.png"))
    args = ap.parse_args()
    if not (args.data / "manifest.csv").is_file():
        print(f"MoNuSeg not found at {args.data}; skipping (see {SHARED_DATA / 'README.md'})")
        return 0
    torch.manual_seed(args.seed)
    items = load_set(args.data)
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(items))
    pool = [items[i] for i in order[:args.train_images]]
    test = [items[i] for i in order[args.train_images:]]
    print(f"MoNuSeg: {len(pool)} pool / {len(test)} test images (split by image, seed {args.seed}); "
          f"test: {', '.join(n for n, _, _ in test)}")
    decoder = (128, 64, 32, 16, 8)[5 - args.depth:] if args.depth < 5 else (256, 128, 64, 32, 16)
    arch = dict(encoder=args.encoder, encoder_depth=args.depth, decoder_channels=decoder)
    opts0 = TrainOptions(epochs=1000, batch_size=args.batch, lr=args.lr, max_steps=args.steps, val_fraction=0.1,
                         patience=1000, seed=args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="slideloop-al-"))
    results: dict[str, list[dict]] = {}
    try:
        base = tmp / "base"
        t0 = time.perf_counter()
        gts = {}
        with Project.create(base, ["Nucleus:#c80000"]) as proj:
            for name, img, gt in pool:
                proj.add_slide(img, mpp=0.25, name=name)
                gts[name] = gt
            proj.build_grid(GridSpec(patch=args.patch, overlap=0, min_tissue=0.0, downsample=args.downsample))
            slides = {s.id: s.name for s in proj.slides()}
            prng = np.random.default_rng(args.seed + 1)
            for p in proj.patches():
                label_patch(proj, p, gts[slides[p.slide_id]], prng, "pre-annotator")
            n_patches = len(proj.patches())
            r0 = train(proj, opts0, **arch)
            predict(proj, r0.model_id, batch_size=16)
            s0 = test_scores(proj, test, args.downsample)
        print(f"{n_patches} pool patches of {args.patch} px; round 0 (pre-annotation only) trained and "
              f"predicted in {time.perf_counter() - t0:.0f} s")
        for strat in args.strategies:
            results[strat] = [{"round": 0, "reviewed": 0, **s0}]
            work = tmp / strat
            shutil.copytree(base, work)
            reviewed: set[int] = set()
            with Project.open(work) as proj:
                slides = {s.id: s.name for s in proj.slides()}
                for rnd in range(1, args.rounds + 1):
                    tr = time.perf_counter()
                    df = scores_frame(proj, "latest")
                    cand = df[~df["patch_id"].isin(reviewed)].copy()
                    if strat == "iou":
                        ranked = IoURanker()(cand.assign(labelled=True))
                    elif strat == "entropy":
                        ranked = UncertaintyRanker("entropy")(cand.assign(labelled=False))
                    else:
                        ranked = RandomRanker(args.seed + rnd)(cand.assign(labelled=False))
                    chosen = [int(i) for i in ranked["patch_id"].head(args.budget)]
                    for pid in chosen:
                        p = proj.patch(pid)
                        label_patch(proj, p, gts[slides[p.slide_id]], None, "reviewer")
                    reviewed.update(chosen)
                    res = train(proj, opts0, from_model="latest")
                    predict(proj, res.model_id, batch_size=16)
                    sc = test_scores(proj, test, args.downsample)
                    results[strat].append({"round": rnd, "reviewed": len(reviewed), **sc})
                    print(f"  {strat:8s} round {rnd}: reviewed {len(reviewed):4d}  test IoU {sc['iou']:.3f}  "
                          f"Dice {sc['dice']:.3f}  ({time.perf_counter() - tr:.0f} s)", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"\nTest set: {len(test)} held-out images; nucleus-class IoU and Dice per image, averaged "
          f"(InstantDL U-Net median Jaccard: {INSTANTDL_MEDIAN_JACCARD})")
    print(f"{'strategy':10s} {'round':>5s} {'reviewed':>8s} {'IoU':>7s} {'Dice':>7s} {'median J':>9s}")
    for strat, rows in results.items():
        for r in rows:
            print(f"{strat:10s} {r['round']:5d} {r['reviewed']:8d} {r['iou']:7.3f} {r['dice']:7.3f} "
                  f"{r['median_jaccard']:9.3f}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for strat, rows in results.items():
        xs = [r["reviewed"] for r in rows]
        axes[0].plot(xs, [r["iou"] for r in rows], marker="o", label=strat)
        axes[1].plot(xs, [r["dice"] for r in rows], marker="o", label=strat)
    axes[0].axhline(INSTANTDL_MEDIAN_JACCARD, ls="--", c="grey", label="InstantDL median Jaccard")
    for ax, name in zip(axes, ("test IoU (nucleus)", "test Dice (nucleus)"), strict=True):
        ax.set_xlabel("patches reviewed (ground truth revealed)")
        ax.set_ylabel(name)
        ax.legend()
    fig.suptitle(f"MoNuSeg simulated review: {len(pool)}/{len(test)} images, {args.steps} steps per round")
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"plot: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
