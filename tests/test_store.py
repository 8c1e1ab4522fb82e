from __future__ import annotations

import multiprocessing as mp
import sqlite3

import pytest
from shapely.geometry import box

from al_core import Project, ProjectError, SchemaError
from al_core import store as store_mod
from al_core.store import LabelVersionRow, Meta, Store


def test_create_and_reopen(tmp_path):
    Project.create(tmp_path / "p", ["Tumor:#ff0000", "Stroma:#00ff00", "Ignore:#808080:ignore"]).close()
    with Project.open(tmp_path / "p") as proj:
        classes = proj.classes()
    assert [(c.idx, c.name, c.ignore) for c in classes] == [
        (0, "Background", False), (1, "Tumor", False), (2, "Stroma", False), (3, "Ignore", True)]


def test_not_a_project(tmp_path):
    with pytest.raises(ProjectError, match="not a slideloop project"):
        Project.open(tmp_path)
    (tmp_path / "project.db").write_bytes(b"garbage that is not sqlite" * 100)
    with pytest.raises(ProjectError, match="not a"):
        Project.open(tmp_path)


def test_create_twice_refused(tmp_path):
    Project.create(tmp_path).close()
    with pytest.raises(ProjectError, match="already a slideloop project"):
        Project.create(tmp_path)


def test_bad_class_spec(tmp_path):
    with pytest.raises(ValueError, match="expected NAME:#RRGGBB"):
        Project.create(tmp_path / "a", ["Tumor"])
    with pytest.raises(ValueError, match="not a #RRGGBB"):
        Project.create(tmp_path / "b", ["Tumor:red"])


def test_newer_schema_refused(tmp_path):
    Project.create(tmp_path).close()
    con = sqlite3.connect(tmp_path / "project.db")
    con.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    con.commit()
    con.close()
    with pytest.raises(SchemaError, match="schema 99 is newer"):
        Project.open(tmp_path)


def test_migration_path_runs_in_order(tmp_path, monkeypatch):
    Project.create(tmp_path).close()
    url = f"sqlite:///{tmp_path / 'project.db'}"
    monkeypatch.setattr(store_mod, "SCHEMA_VERSION", 3)
    ran: list[int] = []

    def step(n: int):
        def migrate(conn):
            ran.append(n)
            conn.exec_driver_sql(f"CREATE TABLE added_in_{n + 1} (id INTEGER)")
        return migrate

    with pytest.raises(SchemaError, match="no migration from schema 2"):
        Store(url, migrations={1: step(1)})
    # the failed upgrade rolled back: schema still 1, the table of step 1 is gone
    con = sqlite3.connect(tmp_path / "project.db")
    assert con.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == ("1",)
    assert not con.execute("SELECT name FROM sqlite_master WHERE name='added_in_2'").fetchall()
    con.close()
    ran.clear()
    s = Store(url, migrations={1: step(1), 2: step(2)})
    assert ran == [1, 2]
    with s.read() as session:
        assert session.get(Meta, "schema_version").value == "3"
    s.dispose()


def _writer(root: str, tag: int, n: int) -> None:
    proj = Project.open(root)
    sid = proj.slides()[0].id
    for i in range(n):
        proj.add_label_version(sid, [(1, box(i, tag * 100, i + 5, tag * 100 + 5))], author=f"writer{tag}")
    proj.close()


def test_two_processes_writing_at_once(tmp_path, sample_svs):
    root = tmp_path / "p"
    with Project.create(root) as proj:
        proj.add_slide(sample_svs)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(root), tag, 25)) for tag in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    with Project.open(root) as proj:
        with proj.store.read() as s:
            versions = sorted(v for (v,) in s.query(LabelVersionRow.version).all())
        assert versions == list(range(1, 51))
        assert len(proj.annotations(proj.slides()[0].id)) == 50
    con = sqlite3.connect(root / "project.db")
    assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    con.close()
