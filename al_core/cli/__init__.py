"""The ``slideloop`` command line. Each command module adds its subcommands with ``register(subparsers)``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from al_core import __version__
from al_core.errors import (
    DatabaseError,
    NoGridError,
    NoModelError,
    ScaleError,
    SlideloopError,
    UncalibratedError,
    UnknownScaleError,
)

#: modules whose ``register`` adds subcommands, in help order
COMMAND_MODULES = ("al_core.cli.project_cmds", "al_core.cli.model_cmds", "al_core.cli.app_cmds",
                   "al_core.cli.deploy_cmds", "al_core.cli.simulate_cmds", "al_core.cli.version_cmds",
                   "al_core.cli.repair_cmds")


#: what to type next, after the core's own message, per error type (the core speaks in domain words only)
HINTS: dict[type[BaseException], str] = {
    UncalibratedError: "grid it with --downsample N (N times down from level 0), or add the slide again with "
                       "--mpp M (its µm per pixel) and grid with --mpp",
    UnknownScaleError: "say which scale it was trained at with --mpp M (µm/px) or --downsample N",
    ScaleError: "give the slide's µm per pixel with --mpp (e.g. 0.25 for 40x)",
    NoGridError: "cut the patch grid with 'slideloop grid PROJECT'",
    NoModelError: "train one with 'slideloop train PROJECT' (then 'slideloop predict PROJECT')",
    DatabaseError: "'slideloop restore PROJECT' puts back the newest sound snapshot, if there is one",
}


def hint_for(err: BaseException) -> str | None:
    """The CLI hint for an error, if its type (or a base type) has one."""
    return next((h for t, h in HINTS.items() if isinstance(err, t)), None)


def build_parser() -> argparse.ArgumentParser:
    """The ``slideloop`` argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="slideloop",
        description="Active-learning segmentation for whole-slide images: annotate, train, review, deploy.",
    )
    parser.add_argument("--version", action="version", version=f"slideloop {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress and show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 for a user error, printed as one line)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return int(args.func(args) or 0)
    except (SlideloopError, ValueError, FileNotFoundError) as err:
        if args.verbose:
            raise
        hint = hint_for(err)
        print(f"slideloop {args.command}: error: {err}" + (f" ({hint})" if hint else ""), file=sys.stderr)
        return 2
    except OSError as err:  # a read-only folder, a full disk: one line naming the file, not a traceback
        if args.verbose:
            raise
        where = f"{err.filename}: " if err.filename else ""
        print(f"slideloop {args.command}: error: {where}{err.strerror or err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"slideloop {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
