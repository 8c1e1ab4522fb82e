"""Shared fixtures: the bundled real sample, small slides generated with tifffile, the database a test runs on
(``db_url``: SQLite and PostgreSQL), and (built once per session, only when a test asks) a trained tiny model's
project and small ONNX models.

Only this one conftest.py: a second one outside a package would replace this module as ``conftest`` in
``sys.modules`` and break ``from conftest import run_cli, write_pyramid, tissue_image`` in later test files.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import tifffile

if TYPE_CHECKING:
    from al_core.project.project import Project

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


# --- databases: the project's own SQLite file, or PostgreSQL (a throwaway cluster, tests/_pg.py) ---------


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """URL of a PostgreSQL server for this session: ``$SLIDELOOP_TEST_PG_URL``, else a throwaway cluster."""
    from _pg import URL_ENV, pg_bin, pg_cluster

    if os.environ.get(URL_ENV):
        yield os.environ[URL_ENV]
        return
    if pg_bin() is None:
        pytest.skip("PostgreSQL's server programs (initdb, pg_ctl) are not installed")
    with pg_cluster() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> str | None:
    """``None`` (the project folder's own SQLite file) or the URL of a new, empty PostgreSQL database: pass it
    to ``Project.create``/``Project.open`` and the test runs on both."""
    if request.param == "sqlite":
        return None
    from _pg import new_database

    return new_database(request.getfixturevalue("pg_server"))


# --- built once per session, on first use -------------------------------------------------------------


#: the class list most project tests use: two tissue classes and one ignored
THREE_CLASSES = ["Epithelium:#c80000", "Stroma:#00a000", "Ignore:#808080:ignore"]


@pytest.fixture()
def three_class_project(tmp_path: Path, sample_svs: Path) -> Iterator[Project]:
    """A fresh SQLite project with :data:`THREE_CLASSES` and the sample slide."""
    from al_core.project.project import Project

    proj = Project.create(tmp_path / "p", THREE_CLASSES)
    proj.add_slide(sample_svs)
    yield proj
    proj.close()


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory, sample_svs: Path, sample_geojson: Path) -> tuple[Path, int]:
    """A project with the sample labelled, one tiny trained model and its predictions (engines disposed).

    Shared by every test of al_core.learn: tests that change the project work on a copy (``_engine.clone``).
    """
    from _engine import FAST, TINY, make_project

    from al_core.learn.predict import predict
    from al_core.learn.train import train

    root = tmp_path_factory.mktemp("engine") / "proj"
    with make_project(root, sample_svs, sample_geojson) as proj:
        res = train(proj, FAST, **TINY)
        assert res.status == "done"
        predict(proj, res.model_id, batch_size=16)
    return root, res.model_id


@pytest.fixture(scope="session")
def dark_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fixed 'darkness' convolution as ONNX (its correct output is known: see _deploy_models)."""
    from _deploy_models import Darkness, darkness_metadata

    from al_core.deploy.export import export_onnx

    p = tmp_path_factory.mktemp("dark") / "dark.onnx"
    export_onnx(Darkness(), p, darkness_metadata())
    return p


@pytest.fixture(scope="session")
def unet_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny randomly initialised smp U-Net as ONNX (128 px, 2 classes, 2 µm/px)."""
    from _deploy_models import tiny_unet, unet_metadata

    from al_core.deploy.export import export_onnx

    p = tmp_path_factory.mktemp("unet") / "unet.onnx"
    export_onnx(tiny_unet(), p, unet_metadata())
    return p


@pytest.fixture(scope="session")
def real_patches(sample_svs: Path) -> np.ndarray:
    """Eight 128 px patches of real tissue read at 2 µm/px from the bundled sample."""
    from al_core.wsi.slides import open_slide

    with open_slide(sample_svs) as s:
        return np.stack([s.read((300 + 180 * i, 400 + 150 * (i % 4)), (128, 128), target_mpp=2.0)
                         for i in range(8)])


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory, real_patches: np.ndarray):
    """The tiny U-Net exported with full metadata and a parity check on real patches: (path, model, report)."""
    from _deploy_models import tiny_unet, unet_metadata

    from al_core.deploy.config import InferenceConfig
    from al_core.deploy.export import export_onnx, normalise_patches

    path = tmp_path_factory.mktemp("export") / "model.onnx"
    model = tiny_unet()
    cfg = InferenceConfig.from_dict({k: v for k, v in unet_metadata().items() if k != "metrics"})
    report = export_onnx(model, path, unet_metadata(), check_inputs=normalise_patches(real_patches, cfg))
    return path, model, report
