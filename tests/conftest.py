"""Shared fixtures: the bundled real sample and small slides generated with tifffile."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"
SAMPLE_SVS = SAMPLE / "CMU-1-Small-Region.svs"
SAMPLE_PYRAMID = SAMPLE / "CMU-1-Small-Region.pyramid.tif"
SAMPLE_GEOJSON = SAMPLE / "CMU-1-Small-Region.preannotation.geojson"


@pytest.fixture(scope="session")
def sample_svs() -> Path:
    return SAMPLE_SVS


@pytest.fixture(scope="session")
def sample_pyramid() -> Path:
    return SAMPLE_PYRAMID


@pytest.fixture(scope="session")
def sample_geojson() -> Path:
    return SAMPLE_GEOJSON


def tissue_image(w: int, h: int, seed: int = 0) -> np.ndarray:
    """White glass with a pink, textured ellipse of 'tissue' in the middle (a generated H&E stand-in)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    inside = ((xx - w / 2) / (w * 0.35)) ** 2 + ((yy - h / 2) / (h * 0.3)) ** 2 < 1
    img = np.full((h, w, 3), 242, np.uint8)
    noise = rng.integers(-20, 20, size=(h, w, 1))
    pink = np.clip(np.array([220, 140, 190]) + noise, 0, 255).astype(np.uint8)
    img[inside] = pink[inside]
    return img


def write_pyramid(path: Path, image: np.ndarray, mpp: float | None, levels: int = 3, ome: bool = False) -> Path:
    """A tiled, JPEG-compressed pyramidal TIFF with SubIFDs (the layout of many converters)."""
    kwargs: dict = {}
    if mpp is not None:
        kwargs = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
    with tifffile.TiffWriter(path, ome=ome) as tif:
        meta = {"PhysicalSizeX": mpp, "PhysicalSizeY": mpp} if (ome and mpp) else None
        tif.write(image, subifds=levels - 1, tile=(256, 256), compression="jpeg", photometric="rgb",
                  metadata=meta, **kwargs)
        img = image
        for _ in range(levels - 1):
            img = img[::2, ::2]
            tif.write(img, subfiletype=1, tile=(256, 256), compression="jpeg", photometric="rgb", **kwargs)
    return path


@pytest.fixture(scope="session")
def generated_pyramid(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("gen")
    return write_pyramid(d / "generated.tif", tissue_image(2048, 1536), mpp=0.25)


def run_cli(*args: str, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the installed ``slideloop`` CLI as a user would (a subprocess)."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    script = Path(sys.executable).with_name("slideloop")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "al_core.cli"]
    proc = subprocess.run([*cmd, *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"slideloop {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc
