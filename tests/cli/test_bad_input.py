"""The probe's bad inputs, each run as a user would (the CLI as a subprocess): a non-zero exit, one line naming
the file and the problem, no traceback, and the project still readable with its managed files unchanged."""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import SAMPLE_GEOJSON, SAMPLE_SVS, run_cli


def _build(root: Path) -> Path:
    """A small project: the sample slide labelled, a 64 px grid, a tiny model (its checkpoint written directly)
    and its predictions, plus the model exported to ONNX beside the project."""
    import torch

    from al_core.learn.checkpoint import save_checkpoint
    from al_core.learn.model import build_model, config_for
    from al_core.project.project import Project
    from al_core.project.schema import ModelRow

    proj_dir = root / "P"
    run_cli("init", str(proj_dir), "--classes", "Epithelium:#c80000")
    run_cli("add", str(proj_dir), str(SAMPLE_SVS))
    run_cli("grid", str(proj_dir), "--patch", "64", "--overlap", "16", "--target-mpp", "2.0")
    run_cli("labels", "import", str(proj_dir), str(SAMPLE_GEOJSON))
    with Project.open(proj_dir) as proj:
        cfg = config_for(proj.classes(), proj.grid_spec(), encoder="tu-mobilenetv3_small_050", encoder_depth=3,
                         decoder_channels=(32, 16, 8))
        torch.manual_seed(0)
        save_checkpoint(proj_dir / "models" / "1" / "model.pt", build_model(cfg), cfg)
        with proj.store.write() as s:
            s.add(ModelRow(status="done", checkpoint="models/1/model.pt", config=json.dumps(cfg.to_dict())))
    run_cli("predict", str(proj_dir))
    run_cli("export", str(proj_dir), "-o", str(root / "m.onnx"))
    return proj_dir


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build(tmp_path_factory.mktemp("probe"))


@pytest.fixture
def project(built: Path, tmp_path: Path) -> Path:
    """A fresh copy of the built project (cases may damage it) with the ONNX model beside it."""
    shutil.copytree(built, tmp_path / "P")
    shutil.copy(built.parent / "m.onnx", tmp_path / "m.onnx")
    return tmp_path / "P"


def fingerprint(proj: Path) -> dict[str, str]:
    """sha256 of every file the project manages except the database (whose pages SQLite may rewrite), and
    the database's content as ``status --json`` shows it."""
    files = {str(f.relative_to(proj)): hashlib.sha256(f.read_bytes()).hexdigest()
             for f in sorted(proj.rglob("*")) if f.is_file() and not f.name.startswith("project.db")
             and "snapshots" not in f.relative_to(proj).parts}
    from al_core.project.project import Project

    with Project.open(proj) as opened:
        files["status"] = json.dumps(opened.status(), default=str)
    return files


@dataclass(frozen=True)
class Case:
    """A bad input: the CLI arguments (``{P}`` the project, ``{D}`` its parent, ``{S}`` the sample slide), what
    to do to the project first, and words the one-line error must hold."""

    args: tuple[str, ...]
    says: str
    prepare: Callable[[Path], None] | None = None
    intact: bool = True  # the project's files are unchanged afterwards


def _touch(name: str) -> Callable[[Path], None]:
    return lambda p: (p.parent / name).write_text("a file, not a folder")


OUTPUTS = {
    "labels-export-over-db": Case(("labels", "export", "{P}", "-o", "{P}/project.db"), "managed by the project"),
    "labels-export-over-wal": Case(("labels", "export", "{P}", "-o", "{P}/models/../project.db-wal"),
                                   "managed by the project"),
    "export-over-checkpoint": Case(("export", "{P}", "-o", "{P}/models/1/model.pt"), "managed by the project"),
    "rank-csv-into-cache": Case(("rank", "{P}", "--csv", "{P}/cache/grid-1/queue.csv"), "managed by the project"),
    "infer-into-deployed": Case(("infer", "{D}/m.onnx", "{S}", "-o", "{P}/deployed/x.tiff"), "managed by the project"),
    "infer-into-predictions": Case(("infer", "{D}/m.onnx", "{S}", "-o", "{P}/predictions"), "managed by the project"),
    "labels-export-under-a-file": Case(("labels", "export", "{P}", "-o", "{D}/afile/x.geojson"), "not a folder",
                                       _touch("afile")),
    "labels-export-unwritable": Case(("labels", "export", "{P}", "-o", "/proc/x.geojson"), "cannot write"),
    "export-unwritable": Case(("export", "{P}", "-o", "/proc/m.onnx"), "cannot write"),
    "rank-csv-unwritable": Case(("rank", "{P}", "--csv", "/proc/queue.csv"), "cannot write"),
    "infer-folder-unwritable": Case(("infer", "{D}/m.onnx", "{S}", "-o", "/proc/out"), "cannot write"),
    "infer-folder-is-a-file": Case(("infer", "{D}/m.onnx", "{S}", "-o", "{D}/afile"), "is a file",
                                   _touch("afile")),
}

RESOURCES = {
    "grid-enlarged-1000x": Case(("grid", "{P}", "--patch", "4096", "--downsample", "0.001"), "the limit is 0.25"),
    "grid-too-many-patches": Case(("grid", "{P}", "--patch", "64", "--overlap", "63", "--downsample", "0.25"),
                                  "the limit is 1,000,000"),
    "grid-cache-beyond-the-disk": Case(("grid", "{P}", "--patch", "4096", "--overlap", "4080", "--downsample",
                                        "0.25", "--min-tissue", "0"), "TB, "),
    "grid-patch-too-large": Case(("grid", "{P}", "--patch", "100000"), "at most 4096 px"),
    "grid-target-mpp-enlarging": Case(("grid", "{P}", "--target-mpp", "0.001"), "the limit is 0.25"),
}

def _damage(offset: int) -> Callable[[Path], None]:
    def damage(p: Path) -> None:
        with open(p / "project.db", "r+b") as fh:
            fh.seek(offset)
            fh.write(bytes(random.Random(offset).randrange(256) for _ in range(512)))
    return damage


def _sql(statement: str) -> Callable[[Path], None]:
    def run(p: Path) -> None:
        with contextlib.closing(sqlite3.connect(p / "project.db")) as conn:
            conn.execute(statement)
            conn.commit()
    return run


def _replace_db(content: bytes) -> Callable[[Path], None]:
    return lambda p: (p / "project.db").write_bytes(content)


def _foreign_sqlite(p: Path) -> None:
    (p / "project.db").unlink()
    _sql("CREATE TABLE notes (a TEXT)")(p)


IMPORT = ("labels", "import", "{P}", str(SAMPLE_GEOJSON))
DATABASE = {
    "db-512-bytes-at-8192": Case(IMPORT, "the database is damaged", _damage(8192), intact=False),
    "db-512-bytes-at-4096": Case(IMPORT, "the database is damaged", _damage(4096), intact=False),
    "db-512-bytes-at-0": Case(IMPORT, "not an SQLite database", _damage(0), intact=False),
    "db-schema-version-abc": Case(("status", "{P}"), "schema version 'abc' is not a number",
                                  _sql("UPDATE meta SET value = 'abc' WHERE key = 'schema_version'"), intact=False),
    "db-empty-file": Case(("status", "{P}"), "empty (0 bytes)", _replace_db(b""), intact=False),
    "db-overwritten-by-text": Case(("labels", "export", "{P}", "-o", "{D}/x.geojson"), "not an SQLite database",
                                   _replace_db(b'{"type": "FeatureCollection"}'), intact=False),
    "db-foreign-sqlite": Case(("status", "{P}"), "not a slideloop project database", _foreign_sqlite,
                              intact=False),
}

def _write(name: str, text: str) -> Callable[[Path], None]:
    return lambda p: (p.parent / name).write_text(text)


def _feature(geometry: str, classification: str = '{"name": "Epithelium"}') -> str:
    return ('{"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": ' + geometry
            + ', "properties": {"classification": ' + classification + '}}]}')


SQUARE = '{"type": "Polygon", "coordinates": [[[100, 100], [300, 100], [300, 300], [100, 300], [100, 100]]]}'


def _mask_tile(name: str) -> Callable[[Path], None]:
    def write(p: Path) -> None:
        from PIL import Image

        (p.parent / "tiles" / "Labels").mkdir(parents=True)
        Image.fromarray(np.ones((64, 64), np.uint8)).save(p.parent / "tiles" / "Labels" / name)
    return write


def _huge_label_tiff(p: Path) -> None:
    """A 20000² label TIFF of a few hundred KB (zeros, deflate): its size is wrong for the slide."""
    import tifffile

    tile = np.zeros((1024, 1024), np.uint8)
    tiles = (tile for _ in range(20 * 20))
    tifffile.imwrite(p.parent / "CMU-1-Small-Region.labels.tif", tiles, shape=(20480, 20480), dtype=np.uint8,
                     tile=(1024, 1024), compression="zlib")


def _bare_onnx(p: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 64, 64])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 3, 64, 64])
    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["output"])], "bare", [x], [y])
    onnx.save(helper.make_model(graph), p.parent / "bare.onnx")


def _import(name: str) -> tuple[str, ...]:
    return ("labels", "import", "{P}", "{D}/" + name, "--slide", "CMU-1-Small-Region")


PARSERS = {
    "geojson-infinite-coordinate": Case(_import("a.geojson"), "not a finite number",
                                        _write("a.geojson", _feature(SQUARE.replace("300, 100", "1e309, 100")))),
    "geojson-nan-vertex": Case(_import("a.geojson"), "not a JSON number",
                               _write("a.geojson", _feature(SQUARE.replace("300, 300", "NaN, NaN")))),
    "geojson-huge-coordinate": Case(_import("a.geojson"), "not a finite number within",
                                    _write("a.geojson", _feature(SQUARE.replace("300, 100", "1e300, 100")))),
    "geojson-string-coordinate": Case(_import("a.geojson"), "a position must be 2 or 3 numbers",
                                      _write("a.geojson", _feature(SQUARE.replace("300, 100", '"300", 100')))),
    "geojson-list-class-name": Case(_import("a.geojson"), "is a list, not text",
                                    _write("a.geojson", _feature(SQUARE, '{"name": ["Epithelium"]}'))),
    "geojson-nested-100k-deep": Case(_import("a.geojson"), "nested too deeply",
                                     _write("a.geojson", "[" * 100_000 + "]" * 100_000)),
    "geojson-unknown-geometry-type": Case(_import("a.geojson"), "unknown geometry type",
                                          _write("a.geojson", _feature('{"type": "Blob", "coordinates": []}'))),
    "geojson-properties-a-list": Case(_import("a.geojson"), "'properties' is a list",
                                      _write("a.geojson", _feature(SQUARE).replace(
                                          '"properties": {"classification": {"name": "Epithelium"}}',
                                          '"properties": [1]'))),
    "mask-tile-downsample-zero": Case(_import("tiles"), "downsample d=0 is outside",
                                      _mask_tile("CMU-1-Small-Region [d=0,x=0,y=0,w=64,h=64].png")),
    "mask-tile-downsample-not-a-number": Case(_import("tiles"), "does not hold numbers",
                                              _mask_tile("CMU-1-Small-Region [d=1.2.3,x=0,y=0,w=64,h=64].png")),
    "mask-tile-size-zero": Case(_import("tiles"), "is not a region of a slide",
                                _mask_tile("CMU-1-Small-Region [d=1,x=0,y=0,w=0,h=64].png")),
    "mask-tile-huge-offset": Case(_import("tiles"), "is not a region of a slide",
                                  _mask_tile("CMU-1-Small-Region [d=1,x=" + "9" * 200 + ",y=0,w=64,h=64].png")),
    "label-tiff-20480-px": Case(_import("CMU-1-Small-Region.labels.tif"), "label image is 20480x20480 px",
                                _huge_label_tiff),
    "push-onnx-without-metadata": Case(("push", "{P}", "{D}/bare.onnx"), "no slideloop metadata", _bare_onnx),
}

CASES: dict[str, Case] = {**OUTPUTS, **RESOURCES, **DATABASE, **PARSERS}


def run_case(case: Case, proj: Path) -> subprocess.CompletedProcess[str]:
    """Prepare and run one case; returns the finished process."""
    if case.prepare is not None:
        case.prepare(proj)
    subst = {"{P}": str(proj), "{D}": str(proj.parent), "{S}": str(SAMPLE_SVS)}
    args = []
    for a in case.args:
        for k, v in subst.items():
            a = a.replace(k, v)
        args.append(a)
    return run_cli(*args, check=False)


def assert_clean(proc: subprocess.CompletedProcess[str], says: str) -> None:
    """Exit status 2, one ``error:`` line holding ``says``, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ": error: " in ln]
    assert len(errors) == 1, proc.stderr
    assert says in errors[0], errors[0]


@pytest.mark.parametrize("name", sorted(CASES))
def test_probe_case_is_refused_cleanly(name: str, project: Path) -> None:
    case = CASES[name]
    before = fingerprint(project)
    proc = run_case(case, project)
    assert_clean(proc, case.says)
    if case.intact:
        assert fingerprint(project) == before


def test_parallel_adds_of_one_name_leave_one_slide(project: Path) -> None:
    script = Path(sys.executable).with_name("slideloop")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "al_core.cli"]
    procs = [subprocess.Popen([*cmd, "add", str(project), str(SAMPLE_SVS), "--name", "same"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    results = [(p.wait(timeout=300), p.stderr.read() if p.stderr else "") for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 2, 2, 2], results
    for rc, err in results:
        assert "Traceback" not in err
        if rc:
            assert "already in the project" in err
    status = json.loads(run_cli("status", str(project), "--json").stdout)
    assert [s["name"] for s in status["slides"]].count("same") == 1


def test_status_on_an_empty_database_leaves_it_empty(project: Path) -> None:
    (project / "project.db").write_bytes(b"")
    assert_clean(run_cli("status", str(project), check=False), "empty (0 bytes)")
    assert (project / "project.db").stat().st_size == 0 and not (project / "project.db-wal").exists()


def test_a_damaged_database_is_restored_from_its_snapshot(project: Path) -> None:
    run_cli("labels", "import", str(project), str(SAMPLE_GEOJSON))  # a write-heavy command: snapshots first
    good = json.loads(run_cli("status", str(project), "--json").stdout)
    _damage(8192)(project)
    assert_clean(run_cli("labels", "import", str(project), str(SAMPLE_GEOJSON), check=False),
                 "its newest snapshot is")
    assert_clean(run_cli("status", str(project), "--check", check=False), "the database is damaged")
    restored = run_cli("restore", str(project))
    assert "the replaced database is kept as" in restored.stdout
    assert [f.name for f in project.glob("project.db.damaged-*")]
    check = run_cli("status", str(project), "--check", "--json")
    assert "integrity_check ok" in check.stderr
    after = json.loads(check.stdout)
    assert [s["label_version"] for s in after["slides"]] == [s["label_version"] - 1 for s in good["slides"]]
    run_cli("labels", "import", str(project), str(SAMPLE_GEOJSON))  # the project works again


def test_restore_without_snapshots_says_so(tmp_path: Path) -> None:
    run_cli("init", str(tmp_path / "Q"))
    assert_clean(run_cli("restore", str(tmp_path / "Q"), check=False), "no snapshots")
