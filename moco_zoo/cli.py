"""``moco-zoo`` command line: one subcommand per job, each defined next to the code it drives.

Subcommand modules expose ``add_commands(subparsers)``; each parser sets ``func(args) -> int``.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

from .errors import EXPECTED_ERRORS, report

# Modules that contribute subcommands (make-data; convert, publish, download, list, import-official; eval).
COMMAND_MODULES = ("moco_zoo.data.cli", "moco_zoo.zoo_cli", "moco_zoo.evaluation.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moco-zoo", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    try:
        return int(args.func(args) or 0)
    except EXPECTED_ERRORS as e:  # library errors name the file and the problem: one line, no traceback
        return report(f"moco-zoo {args.command}", e, args.debug)


if __name__ == "__main__":
    sys.exit(main())
