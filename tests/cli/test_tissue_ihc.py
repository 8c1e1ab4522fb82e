"""Tissue that is there is found: a non-pyramidal IHC-like TIFF with one small, weakly stained fragment
(barely saturated: saturation alone finds nothing) gets tissue and patches; a slide with no tissue is named in
a warning when gridded, and `labels preannotate` reports it as an error, not a success."""

from __future__ import annotations

import json

import numpy as np
import tifffile
from conftest import run_cli, tissue_image, write_pyramid

from al_core.wsi.tissue import stain_density_mask, tissue_mask_from_rgb


def _ihc_fragment(w: int = 2400, h: int = 1800, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Glass with a pale hematoxylin fragment and a few faint DAB-brown cells; returns (image, truth)."""
    rng = np.random.default_rng(seed)
    img = np.clip(242 + rng.normal(0, 2.5, (h, w, 3)), 0, 255).astype(np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    cx, cy = w * 0.6, h * 0.4
    frag = ((xx - cx) / 300) ** 2 + ((yy - cy) / 200) ** 2 < 1
    pale = np.clip(np.array([212, 209, 219]) + rng.normal(0, 3, (h, w, 3)), 0, 255).astype(np.uint8)
    img[frag] = pale[frag]
    cells = frag & (rng.random((h, w)) < 0.002)
    img[cells] = (196, 184, 172)
    return img, frag


def test_saturation_misses_the_fragment_but_stain_density_finds_it():
    img, truth = _ihc_fragment()
    small, t = img[::16, ::16], truth[::16, ::16]
    mask = tissue_mask_from_rgb(small, pixel_um=8.0)
    iou = (mask & t).sum() / (mask | t).sum()
    assert iou > 0.7
    assert stain_density_mask(small).sum() > 0.5 * t.sum()
    # plain glass, also noisy, stays glass
    rng = np.random.default_rng(1)
    glass = np.clip(242 + rng.normal(0, 2.5, small.shape), 0, 255).astype(np.uint8)
    assert not tissue_mask_from_rgb(glass, pixel_um=8.0).any()
    # H&E is unchanged: saturation still decides
    he = tissue_image(400, 300)
    he_truth = (he != 242).any(axis=2)
    he_mask = tissue_mask_from_rgb(he, pixel_um=8.0)
    assert (he_mask & he_truth).sum() / (he_mask | he_truth).sum() > 0.9


def test_faint_ihc_slide_gets_patches_and_an_empty_slide_is_named(tmp_path):
    img, _ = _ihc_fragment()
    ihc = tmp_path / "ihc.tif"
    tifffile.imwrite(ihc, img, photometric="rgb", resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
    blank = write_pyramid(tmp_path / "blank.tif", np.full((1024, 1024, 3), 243, np.uint8), mpp=0.5, levels=2)
    root = tmp_path / "proj"
    run_cli("init", str(root), "--classes", "Epithelium:#c80000")
    added = {r["name"]: r for r in json.loads(run_cli("add", str(root), str(ihc), str(blank), "--json").stdout)}
    assert added["ihc"]["tissue_fraction"] > 0.01 and added["blank"]["tissue_fraction"] == 0
    grid = run_cli("grid", str(root), "--patch", "128", "--json")
    out = json.loads(grid.stdout)
    patches = {s["slide"]: s["patches"] for s in out["slides"]}
    assert patches["ihc"] > 0 and patches["blank"] == 0 and out["no_tissue"] == ["blank"]
    assert "slide blank yields no tissue patches" in grid.stderr
    pre = run_cli("labels", "preannotate", str(root), check=False)
    assert pre.returncode == 1
    assert "blank: no tissue was found on the slide" in pre.stderr
    assert "ihc:" in pre.stdout and "blank" not in pre.stdout  # the other slide still got its pre-annotation
