"""Output helpers shared by the command modules: a table for people, JSON for scripts.

The command modules import the core inside their command functions, not at the top: ``slideloop --help``
builds every subcommand's parser and must not import SQLAlchemy, torch or the slide readers to do so."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from al_core.project.project import Project


def add_project_arg(p: argparse.ArgumentParser) -> None:
    """The PROJECT positional argument."""
    p.add_argument("project", metavar="PROJECT", help="project folder")


def add_json_arg(p: argparse.ArgumentParser) -> None:
    """The --json flag."""
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")


#: commands that rewrite much of the database: each first snapshots it (``slideloop restore`` goes back)
SNAPSHOT_BEFORE = frozenset({"add", "grid", "labels import", "labels preannotate", "train", "predict"})


def open_project(args: argparse.Namespace) -> Project:
    """The project the command names: runs whose process died are ended first (and said so on stderr), and the
    database is snapshotted first if the command is in :data:`SNAPSHOT_BEFORE`."""
    from al_core.project.project import Project
    from al_core.project.reaper import reap

    proj = Project.open(args.project)
    for line in reap(proj):
        print(f"note: {line}; marked failed", file=sys.stderr)
    command = " ".join(c for c in (args.command, getattr(args, "labels_command", None)) if c)
    if command in SNAPSHOT_BEFORE:
        proj.snapshot(command)
    return proj


def model_ref(value: str | None) -> int | str | None:
    """``--model``/``--from`` as a model reference: digits become an id, anything else stays (``latest``)."""
    return int(value) if value is not None and value.isdigit() else value


def emit_json(data: Any) -> None:
    """Print ``data`` as indented JSON."""
    print(json.dumps(data, indent=2, default=str))


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A plain fixed-width table (no dependency, copy-pastable into a ticket)."""
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) if _numeric(v) else v.ljust(w) for v, w in zip(row, widths, strict=True))
              for row in cells]
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _numeric(v: str) -> bool:
    try:
        float(v)
        return True
    except ValueError:
        return False
