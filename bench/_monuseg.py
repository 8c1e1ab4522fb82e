"""MoNuSeg (H&E nuclei) helpers shared by the benchmarks: the image list, a fully labelled project, test scores.

Data: ``../shared/data/seg/monuseg`` beside the repository (research-use terms: read in place, never copied into
the repository; the benchmarks skip cleanly when it is absent).
"""

from __future__ import annotations

import csv
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


def split(items: list, seed: int = 0, n_pool: int = 24) -> tuple[list, list]:
    """The seeded image split (24/6 by default): (pool, test)."""
    order = np.random.default_rng(seed).permutation(len(items))
    return [items[i] for i in order[:n_pool]], [items[i] for i in order[n_pool:]]


def labelled_project(root: Path, images: list, patch: int, downsample: float, overlap: int | None = None) -> Project:
    """A project with ``images`` as slides, cut into a grid, every patch carrying its full ground truth."""
    proj = Project.create(root, ["Nucleus:#c80000"])
    gts = {}
    for name, img, gt in images:
        proj.add_slide(img, mpp=0.25, name=name)
        gts[name] = gt
    proj.build_grid(GridSpec(patch=patch, overlap=overlap, min_tissue=0.0, downsample=downsample))
    slides = {s.id: s.name for s in proj.slides()}
    for p in proj.patches():
        label_patch(proj, p, gts[slides[p.slide_id]], None, "ground truth")
    return proj
