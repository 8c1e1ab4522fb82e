"""The project database (al_core.project.store): create/open, schema checks and migrations, concurrent writers."""

from __future__ import annotations

import multiprocessing as mp
import sqlite3

import pytest
from shapely.geometry import box

from al_core import GridSpec, Project, ProjectError, SchemaError
from al_core.project import store as store_mod
from al_core.project.schema import LabelVersionRow, Meta
from al_core.project.store import SCHEMA_VERSION, Store


def test_create_and_reopen(tmp_path, db_url):
    Project.create(tmp_path / "p", ["Tumor:#ff0000", "Stroma:#00ff00", "Ignore:#808080:ignore"], db_url=db_url).close()
    with Project.open(tmp_path / "p", db_url=db_url) as proj:
        classes = proj.classes()
        assert proj.store.dialect == ("sqlite" if db_url is None else "postgresql")
        assert proj.store.get_meta("schema_version") == str(SCHEMA_VERSION)
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
    now = SCHEMA_VERSION
    monkeypatch.setattr(store_mod, "SCHEMA_VERSION", now + 2)
    ran: list[int] = []

    def step(n: int):
        def migrate(conn):
            ran.append(n)
            conn.exec_driver_sql(f"CREATE TABLE added_in_{n + 1} (id INTEGER)")
        return migrate

    with pytest.raises(SchemaError, match=f"no migration from schema {now + 1}"):
        Store(url, migrations={now: step(now)})
    # the failed upgrade rolled back: schema unchanged, the table of the first step is gone
    con = sqlite3.connect(tmp_path / "project.db")
    assert con.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == (str(now),)
    assert not con.execute(f"SELECT name FROM sqlite_master WHERE name='added_in_{now + 1}'").fetchall()
    con.close()
    ran.clear()
    s = Store(url, migrations={now: step(now), now + 1: step(now + 1)})
    assert ran == [now, now + 1]
    with s.read() as session:
        assert session.get(Meta, "schema_version").value == str(now + 2)
    s.dispose()


def _downgrade_to_v1(db) -> None:
    """Rewrite a current database as schema 1 wrote it: reviews keyed by patch only, jobs without a model,
    patch scores without MC dropout (schema 3), no process columns (schema 4)."""
    con = sqlite3.connect(db)
    con.executescript("""
        PRAGMA foreign_keys=OFF;
        BEGIN;
        CREATE TABLE reviews_v1 (id INTEGER PRIMARY KEY, patch_id INTEGER NOT NULL REFERENCES patches(id)
            ON DELETE CASCADE, label_version INTEGER NOT NULL, author VARCHAR(128) NOT NULL,
            action VARCHAR(32) NOT NULL, created_at VARCHAR(32) NOT NULL);
        INSERT INTO reviews_v1 SELECT id, patch_id, label_version, author, action, created_at FROM reviews;
        DROP TABLE reviews;
        ALTER TABLE reviews_v1 RENAME TO reviews;
        CREATE INDEX ix_reviews_patch_id ON reviews (patch_id);
        CREATE TABLE jobs_v1 AS SELECT id, kind, params, status, dask_key, author, submitted, started, finished,
            progress, result, error, cancel_requested FROM jobs;
        DROP TABLE jobs;
        ALTER TABLE jobs_v1 RENAME TO jobs;
        ALTER TABLE patch_scores DROP COLUMN mcdropout;
        ALTER TABLE slides DROP COLUMN tags;
        ALTER TABLE models DROP COLUMN pid;
        ALTER TABLE models DROP COLUMN host;
        UPDATE meta SET value='1' WHERE key='schema_version';
        COMMIT;
    """)
    con.close()


def test_schema_1_project_is_migrated_and_keeps_its_reviews(tmp_path, sample_svs):
    root = tmp_path / "p"
    with Project.create(root) as proj:
        proj.add_slide(sample_svs)
        proj.build_grid(GridSpec(patch=256, overlap=0))
        reviewed = proj.patches()[3]
        proj.mark_reviewed(reviewed.id, author="dr-a")
    _downgrade_to_v1(root / "project.db")
    con = sqlite3.connect(root / "project.db")
    assert "slide_id" not in {r[1] for r in con.execute("PRAGMA table_info(reviews)")}
    con.close()
    with Project.open(root) as proj:
        assert proj.store.get_meta("schema_version") == str(SCHEMA_VERSION)
        # the migration gave the old review its slide region: it still counts, also on a rebuilt grid
        assert proj.labels.reviewed_regions() == [(reviewed.slide_id, reviewed.x, reviewed.y, reviewed.size)]
        assert proj.reviewed_patch_ids() == {reviewed.id}
        proj.build_grid(GridSpec(patch=256, overlap=0))
        [again] = [p for p in proj.patches() if (p.x, p.y) == (reviewed.x, reviewed.y)]
        assert again.id != reviewed.id and proj.reviewed_patch_ids() == {again.id}
    con = sqlite3.connect(root / "project.db")
    assert "model_id" in {r[1] for r in con.execute("PRAGMA table_info(jobs)")}
    assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    con.close()


def _writer(root: str, db_url: str | None, tag: int, n: int) -> None:
    proj = Project.open(root, db_url=db_url)
    sid = proj.slides()[0].id
    for i in range(n):
        proj.labels.add(sid, [(1, box(i, tag * 100, i + 5, tag * 100 + 5))], author=f"writer{tag}")
    proj.close()


def test_two_processes_writing_at_once(tmp_path, sample_svs, db_url):
    root = tmp_path / "p"
    with Project.create(root, db_url=db_url) as proj:
        proj.add_slide(sample_svs)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(root), db_url, tag, 25)) for tag in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    with Project.open(root, db_url=db_url) as proj:
        with proj.store.read() as s:
            versions = sorted(v for (v,) in s.query(LabelVersionRow.version).all())
        assert versions == list(range(1, 51))
        assert len(proj.annotations(proj.slides()[0].id)) == 50
    if db_url is None:
        con = sqlite3.connect(root / "project.db")
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        con.close()
