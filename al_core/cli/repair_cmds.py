"""Repair commands: list the project's database snapshots, restore one."""

from __future__ import annotations

import argparse
from pathlib import Path

from al_core.cli._common import add_json_arg, add_project_arg, emit_json, format_table


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``restore`` subcommand."""
    p = sub.add_parser("restore", help="put a database snapshot back (taken before each write-heavy command)")
    add_project_arg(p)
    p.add_argument("--snapshot", metavar="FILE", help="the snapshot to restore (default: the newest sound one)")
    p.add_argument("--list", action="store_true", help="only list the snapshots, newest first")
    add_json_arg(p)
    p.set_defaults(func=cmd_restore)


def cmd_restore(args: argparse.Namespace) -> int:
    """``slideloop restore``: replace a damaged ``project.db`` by a snapshot; the damaged file is kept beside it."""
    from al_core.project.integrity import list_snapshots, restore_snapshot
    from al_core.project.project import DB_NAME

    root = Path(args.project)
    if args.list:
        rows = [{"taken": s.taken, "file": str(s.path)} for s in list_snapshots(root)]
        if args.json:
            emit_json(rows)
        else:
            print(format_table(rows, ["taken", "file"]) if rows else "no snapshots")
        return 0
    snap, moved = restore_snapshot(root / DB_NAME, Path(args.snapshot) if args.snapshot else None)
    if args.json:
        emit_json({"restored": str(snap.path), "taken": snap.taken, "moved_aside": None if moved is None else str(moved)})
    else:
        print(f"restored the snapshot of {snap.taken} ({snap.path})"
              + (f"; the replaced database is kept as {moved}" if moved else ""))
    return 0
