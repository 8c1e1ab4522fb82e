"""The command line starts without the heavy libraries: ``--help`` imports none of the core's dependencies and
``status`` only the database and geometry ones (the real ``slideloop`` entry point, as a subprocess, its imports
listed by Python's ``-X importtime``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from al_core.project.project import Project
from al_core.wsi.grid import GridSpec

#: never needed to print help or a project's status
HEAVY = {"torch", "onnxruntime", "tiffslide", "tifffile", "scipy", "skimage", "rasterio", "cv2", "PIL", "dask",
         "distributed", "pandas", "segmentation_models_pytorch", "albumentations"}
#: --help does not even open a database
HELP_FREE = HEAVY | {"sqlalchemy", "shapely", "numpy"}


def imported_packages(*args: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Run ``python -m al_core.cli ARGS`` with ``-X importtime``: its result and every top-level package it imported."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "al_core.cli", *args], capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    names = set()
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    assert "al_core" in names, proc.stderr[-2000:]  # the listing worked
    return proc, names


def test_help_imports_none_of_the_heavy_libraries() -> None:
    proc, names = imported_packages("--help")
    assert proc.returncode == 0 and "labels" in proc.stdout and "infer" in proc.stdout
    assert names & HELP_FREE == set()


@pytest.mark.parametrize("command", ["train", "infer", "labels"])
def test_subcommand_help_imports_none_of_the_heavy_libraries(command: str) -> None:
    proc, names = imported_packages(command, "--help")
    assert proc.returncode == 0 and "usage: slideloop" in proc.stdout
    assert names & HELP_FREE == set()


def test_status_reads_the_project_without_the_heavy_libraries(tmp_path: Path, sample_svs: Path,
                                                             sample_geojson: Path) -> None:
    with Project.create(tmp_path / "proj") as proj:
        proj.add_slide(sample_svs)
        proj.build_grid(GridSpec(patch=256))
        proj.import_labels(sample_geojson)
        labelled = len(proj.labelled_patch_ids())
    proc, names = imported_packages("status", str(tmp_path / "proj"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"{labelled} labelled" in proc.stdout.splitlines()[-1]  # the real figures, labels included
    assert names & HEAVY == set()
