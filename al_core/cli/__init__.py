"""The ``slideloop`` command line. Each command module adds its subcommands with ``register(subparsers)``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from al_core import __version__
from al_core.errors import SlideloopError

#: modules whose ``register`` adds subcommands, in help order
COMMAND_MODULES = ("al_core.cli.project_cmds", "al_core.cli.model_cmds", "al_core.cli.app_cmds",
                   "al_core.cli.deploy_cmds")


def build_parser() -> argparse.ArgumentParser:
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
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return int(args.func(args) or 0)
    except (SlideloopError, ValueError, FileNotFoundError) as err:
        if args.verbose:
            raise
        print(f"slideloop {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"slideloop {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
