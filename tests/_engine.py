"""The tiny model and project the al_core.learn tests share (see conftest's ``trained`` fixture).

One tiny model (timm MobileNetV3-small encoder, depth 3, 128 px patches) is trained once per session on the
sample's pre-annotation; tests that change labels work on a copy of that project (:func:`clone`).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from al_core.learn.train import TrainOptions
from al_core.project.project import Project
from al_core.wsi.grid import GridSpec

TINY = dict(encoder="tu-mobilenetv3_small_050", encoder_depth=3, decoder_channels=(32, 16, 8))
FAST = TrainOptions(epochs=5, batch_size=4, lr=3e-3, max_steps=20, val_fraction=0.1, seed=0)


def make_project(root: Path, svs: Path, geojson: Path | None) -> Project:
    """The sample on a 128 px grid without overlap, labelled with its pre-annotation when given."""
    proj = Project.create(root, ["Epithelium:#c80000"])
    proj.add_slide(svs)
    proj.build_grid(GridSpec(patch=128, overlap=0))
    if geojson is not None:
        proj.import_labels(geojson)
    return proj


def clone(src: Path, dst: Path) -> Project:
    """A copy of a project folder, opened (the copy's own database and files)."""
    shutil.copytree(src, dst)
    return Project.open(dst)


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()
