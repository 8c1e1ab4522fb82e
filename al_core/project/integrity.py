"""The project database's health: checked when opened, snapshotted before write-heavy work, restored from a snapshot.

Recovery works on SQLite's online backup API: :func:`take_snapshot` copies the open database page by page into
``<project>/snapshots/`` (consistent even while the tile server reads it) and keeps the newest
:data:`KEEP_SNAPSHOTS`. :func:`restore_snapshot` checks a snapshot in full, moves the damaged database (with
its WAL and shared-memory files, which would otherwise be replayed onto the restored copy) aside as
``project.db.damaged-<time>``, and puts the snapshot in its place through a temporary file and a rename.
PostgreSQL has its own tools (``pg_dump``); nothing here touches a server database.
"""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from al_core._guards import check_free_space
from al_core._io import atomic_path
from al_core.errors import DatabaseError

log = logging.getLogger(__name__)

SNAPSHOTS_DIR = "snapshots"
KEEP_SNAPSHOTS = 5
#: databases up to this size get ``PRAGMA quick_check`` each time they are opened (about 1 s per GB)
QUICK_CHECK_BYTES = 256 << 20
SQLITE_MAGIC = b"SQLite format 3\x00"
_COMPANIONS = ("-wal", "-shm", "-journal")


def sqlite_file(url: str) -> Path | None:
    """The file of an ``sqlite:///…`` URL (``None`` for another database or an in-memory one)."""
    prefix = "sqlite:///"
    if not url.startswith(prefix) or url == "sqlite://" or ":memory:" in url:
        return None
    return Path(url[len(prefix):])


def recovery(db: Path) -> str:
    """What the user can do about a damaged database: the newest snapshot, if there is one."""
    snaps = list_snapshots(db.parent)
    if snaps:
        return f"its newest snapshot is {snaps[0].path} ({snaps[0].taken})"
    return "the project has no snapshot to restore; the files beside the database (models, labels exports) remain"


def precheck(db: Path) -> None:
    """Refuse, without opening it (opening writes to it), a file that is empty or not SQLite at all."""
    try:
        size = db.stat().st_size
        with open(db, "rb") as fh:
            head = fh.read(len(SQLITE_MAGIC))
    except OSError as err:
        raise DatabaseError(db, f"cannot read the database ({err.strerror or err})") from None
    if size == 0:
        raise DatabaseError(db, f"the database file is empty (0 bytes); {recovery(db)}")
    if head != SQLITE_MAGIC:
        raise DatabaseError(db, f"not an SQLite database (a foreign or overwritten file); {recovery(db)}")


def check(conn: sqlite3.Connection, db: Path, *, full: bool = False) -> None:
    """``PRAGMA quick_check`` (or the full ``integrity_check``) on an open connection; damage raises."""
    pragma = "integrity_check" if full else "quick_check"
    try:
        rows = [r[0] for r in conn.execute(f"PRAGMA {pragma}(20)").fetchall()]
    except sqlite3.DatabaseError as err:
        rows = [str(err)]
    if rows != ["ok"]:
        rows = [ln for r in rows for ln in str(r).splitlines() if ln.strip() and not ln.startswith("***")]
        detail = "; ".join(rows[:3]) + (f" (+{len(rows) - 3} more)" if len(rows) > 3 else "")
        raise DatabaseError(db, f"the database is damaged ({pragma}: {detail}); {recovery(db)}")


def check_file(db: Path, *, full: bool = False) -> None:
    """:func:`precheck` and :func:`check` on a database file, read-only."""
    precheck(db)
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        check(conn, db, full=full)
    finally:
        conn.close()


@dataclass(frozen=True)
class Snapshot:
    """A snapshot file of a project's database and when it was taken (UTC, from its name)."""

    path: Path
    taken: str


def list_snapshots(root: Path) -> list[Snapshot]:
    """The project's snapshots, newest first."""
    folder = root / SNAPSHOTS_DIR
    if not folder.is_dir():
        return []
    files = sorted(folder.glob("project-*.db"), reverse=True)
    return [Snapshot(f, _taken(f)) for f in files]


def _taken(f: Path) -> str:
    stamp = f.stem.split("-")[1] if f.stem.count("-") >= 1 else ""
    return f"{stamp[:4]}-{stamp[4:6]}-{stamp[6:8]} {stamp[9:11]}:{stamp[11:13]}:{stamp[13:15]} UTC" if len(
        stamp) >= 15 else f.name


def take_snapshot(db: Path, reason: str) -> Snapshot | None:
    """Copy ``db`` into the project's snapshots with the online backup API; keeps the newest few.

    A disk too full for the copy skips the snapshot with a warning (the command itself still runs).
    """
    folder = db.parent / SNAPSHOTS_DIR
    try:
        check_free_space(folder, db.stat().st_size, "a database snapshot")
    except Exception as err:  # DiskSpaceError or an unreadable size: a snapshot is a courtesy, not a must
        log.warning("no snapshot taken: %s", err)
        return None
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f"{time.time_ns() % 1_000_000_000:09d}"
    dest = folder / f"project-{stamp}-{''.join(c if c.isalnum() else '_' for c in reason)}.db"
    src = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        with atomic_path(dest) as tmp:
            out = sqlite3.connect(tmp)
            try:
                src.backup(out)
            finally:
                out.close()
    finally:
        src.close()
    for old in list_snapshots(db.parent)[KEEP_SNAPSHOTS:]:
        old.path.unlink(missing_ok=True)
    return Snapshot(dest, _taken(dest))


def restore_snapshot(db: Path, snapshot: Path | None = None) -> tuple[Snapshot, Path | None]:
    """Put a snapshot (default: the newest sound one) in place of ``db``; returns it and where the replaced
    database was moved (``None`` if there was none)."""
    snaps = [Snapshot(snapshot, _taken(snapshot))] if snapshot else list_snapshots(db.parent)
    if not snaps:
        raise DatabaseError(db, "the project has no snapshots to restore")
    chosen = None
    for snap in snaps:
        try:
            check_file(snap.path, full=True)
        except DatabaseError as err:
            if snapshot is not None:
                raise
            log.warning("skipping a damaged snapshot: %s", err)
            continue
        chosen = snap
        break
    if chosen is None:
        raise DatabaseError(db, "every snapshot of the project is damaged too")
    moved = None
    if db.exists():
        moved = db.with_name(f"{db.name}.damaged-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}")
        os.replace(db, moved)
    for suffix in _COMPANIONS:  # a stale WAL would be replayed onto the restored pages
        side = db.with_name(db.name + suffix)
        if side.exists():
            os.replace(side, (moved or db).with_name((moved or db).name + suffix))
    with atomic_path(db) as tmp:
        shutil.copyfile(chosen.path, tmp)
    return chosen, moved
