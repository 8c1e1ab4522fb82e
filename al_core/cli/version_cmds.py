"""Model version commands: ``slideloop models list|activate|tolerance`` (which version is active, and why)."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

from al_core.cli._common import add_json_arg, add_project_arg, emit_json, format_table, open_project

if TYPE_CHECKING:
    from al_core.project.project import Project


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``models`` command and its ``list``, ``activate`` and ``tolerance`` actions."""
    models = sub.add_parser("models", help="model versions: list them, choose the active one")
    msub = models.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    p = msub.add_parser("list", help="every version: scale, validation score, which one is active and why")
    add_project_arg(p)
    add_json_arg(p)
    p.set_defaults(func=cmd_list)
    p = msub.add_parser("activate", help="make a version the active one (predict, rank, export, the queue)")
    add_project_arg(p)
    p.add_argument("model", metavar="MODEL", help="model id")
    p.add_argument("--author", default="cli", help="who chose it (recorded)")
    add_json_arg(p)
    p.set_defaults(func=cmd_activate)
    p = msub.add_parser("tolerance", help="show or set how much lower a new version may score and be promoted")
    add_project_arg(p)
    p.add_argument("value", nargs="?", type=float, help="macro IoU difference (default 0.02)")
    add_json_arg(p)
    p.set_defaults(func=cmd_tolerance)


def model_rows(proj: Project) -> list[dict[str, Any]]:
    """One plain row per model version, oldest first."""
    active = proj.models.active_record()
    out = []
    for r in proj.models.list():
        cfg = json.loads(r.config or "{}")
        ev = json.loads(r.metrics or "{}").get("evaluation") or {}
        scale = (f"{cfg['target_mpp']:g} µm/px" if cfg.get("target_mpp") else
                 f"downsample {cfg['downsample']:g} (uncalibrated)" if cfg.get("uncalibrated") else "unknown")
        is_active = active is not None and int(active["id"]) == r.id
        out.append({"id": r.id, "parent": r.parent_id, "status": r.status, "scale": scale,
                    "val_iou": ev.get("score"), "compared_with": ev.get("active_id"),
                    "their_iou": ev.get("active_score"), "val_patches": ev.get("patches"),
                    "decision": ("promoted" if ev.get("promoted") else "kept back") if ev else None,
                    "active": is_active, "reason": (active or {}).get("reason") if is_active else ev.get("reason")})
    return out


def cmd_list(args: argparse.Namespace) -> int:
    """``slideloop models list``: the versions, the active one marked."""
    with open_project(args) as proj:
        rows = model_rows(proj)
    if args.json:
        emit_json(rows)
    elif not rows:
        print("no model versions yet")
    else:
        for r in rows:
            r["active"] = "*" if r["active"] else ""
        print(format_table(rows, ["active", "id", "parent", "status", "scale", "val_iou", "compared_with",
                                  "their_iou", "val_patches", "decision", "reason"]))
    return 0


def cmd_activate(args: argparse.Namespace) -> int:
    """``slideloop models activate``: a user's choice of the active model version."""
    if not args.model.isdigit():
        raise ValueError(f"model {args.model!r}: give a model id (see 'slideloop models list')")
    with open_project(args) as proj:
        before = proj.models.active()
        proj.models.activate(int(args.model), by=args.author, reason=f"chosen by {args.author}", chosen=True)
    out = {"active": int(args.model), "previous": before.id if before else None}
    if args.json:
        emit_json(out)
    else:
        print(f"model {out['active']} is active (was {out['previous'] if out['previous'] else 'none'})")
    return 0


def cmd_tolerance(args: argparse.Namespace) -> int:
    """``slideloop models tolerance``: print, or set, the project's promotion tolerance."""
    from al_core.learn.promote import set_tolerance, tolerance

    with open_project(args) as proj:
        if args.value is not None:
            set_tolerance(proj, args.value)
        value = tolerance(proj)
    if args.json:
        emit_json({"tolerance": value})
    else:
        print(f"a new model version becomes active when its validation IoU is at most {value:g} below the "
              "active one's")
    return 0
