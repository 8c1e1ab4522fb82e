"""Guards every output-writing command calls before it writes: never onto a file the project manages, never
more than the disk holds, never into a folder that cannot be written.

A project is any folder holding ``project.db``; what slideloop keeps there (the database and its journals,
checkpoints, caches, predictions, deployed models, snapshots, uploads and run outputs) is the project's, and
an output path landing on it is refused however it is spelled (relative, ``..``, symlinks).
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path

from al_core.errors import DiskSpaceError, OutputError

DB_FILE = "project.db"
#: files beside the database that SQLite owns
DB_COMPANIONS = ("", "-wal", "-shm", "-journal")
#: folders of a project that slideloop manages (see each owning module's ``*_DIR``)
MANAGED_DIRS = ("models", "cache", "predictions", "deployed", "uploads", "inference", "snapshots")
#: room left free on top of an estimate: file-system metadata, the temporary copy beside the final name
MARGIN = 1.05


#: the project whose managed folders the code running now writes on purpose (its own inference runs)
_OWN_WRITES: ContextVar[Path | None] = ContextVar("slideloop_own_writes", default=None)


@contextlib.contextmanager
def project_writes(root: str | os.PathLike[str]) -> Iterator[None]:
    """Within the block, outputs into ``root``'s managed folders are the project's own (not refused)."""
    token = _OWN_WRITES.set(Path(os.path.realpath(root)))
    try:
        yield
    finally:
        _OWN_WRITES.reset(token)


def _project_of(path: Path) -> Path | None:
    """The nearest project folder at or above ``path``'s folder (``None`` outside any project)."""
    for folder in (path, *path.parents):
        if (folder / DB_FILE).is_file():
            return folder
    return None


def managed_by_project(path: str | os.PathLike[str]) -> Path | None:
    """The project whose managed file ``path`` is (or would be), else ``None``."""
    p = Path(os.path.realpath(Path(path).expanduser()))
    root = _project_of(p.parent)
    if root is None:
        return _project_of(p) if (p / DB_FILE).is_file() else None
    rel = p.relative_to(root)
    if not rel.parts:
        return root
    if len(rel.parts) == 1 and any(rel.name == DB_FILE + c for c in DB_COMPANIONS):
        return root
    if rel.parts[0] in MANAGED_DIRS:
        return root
    if rel.name.startswith(f".{DB_FILE}"):  # a temporary copy of the database
        return root
    return None


def check_output(path: str | os.PathLike[str], *, what: str = "output", folder: bool = False) -> Path:
    """Refuse an output path on a project-managed file, or one that cannot be written; returns it as a Path.

    ``folder``: the output is a folder (created if missing) rather than a file.
    """
    p = Path(path).expanduser()
    root = managed_by_project(p)
    if root is not None and root != _OWN_WRITES.get():
        raise OutputError(p, f"is managed by the project {root} (its database, models, caches or deployed "
                             f"models); write the {what} somewhere else")
    if not folder and p.is_dir():
        raise OutputError(p, f"is a folder; name a file for the {what}")
    if folder and p.exists() and not p.is_dir():
        raise OutputError(p, f"is a file; name a folder for the {what}")
    parent = p if folder else p.parent
    existing = next(q for q in (parent, *parent.parents) if q.exists() or q == q.parent)
    if not existing.is_dir():
        raise OutputError(p, f"{existing} is a file, not a folder")
    _probe_writable(p, existing)
    if p.exists() and not folder and not os.access(p, os.W_OK):
        raise OutputError(p, "the file exists and is read-only")
    return p


def _probe_writable(p: Path, folder: Path) -> None:
    """Create and remove a file in ``folder``: the only test that holds for root, read-only mounts and ACLs."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".slideloop-probe-", dir=folder)
    except OSError as err:
        raise OutputError(p, f"cannot write in {folder} ({err.strerror or err})") from None
    os.close(fd)
    os.unlink(probe)


def human_bytes(n: float) -> str:
    """``7.4 TB``, ``70 GB``, ``512 B`` (decimal units, as ``df -H`` shows them)."""
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" or n >= 100 else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"  # pragma: no cover  (the loop returns)


def free_bytes(path: str | os.PathLike[str]) -> tuple[int, Path]:
    """Free bytes on the file system that holds ``path`` (or its nearest existing folder), and that folder."""
    p = Path(path).expanduser().absolute()
    existing = next(q for q in (p, *p.parents) if q.exists())
    return shutil.disk_usage(existing).free, existing


def check_free_space(path: str | os.PathLike[str], needed: float, what: str) -> None:
    """Refuse to write ``needed`` bytes (an estimate) of ``what`` at ``path`` when the disk cannot hold them."""
    if not math.isfinite(needed) or needed < 0:
        raise DiskSpaceError(path, f"{what} has no sensible size estimate ({needed})")
    free, where = free_bytes(path)
    if needed * MARGIN > free:
        raise DiskSpaceError(path, f"{what} needs {human_bytes(needed)}, {human_bytes(free)} free on {where}")
