"""``moco-zoo`` command line: one subcommand per job, each defined next to the code it drives.

Subcommand modules expose ``add_commands(subparsers)``; each parser sets ``func(args) -> int``.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

# Modules that contribute subcommands (make-data; convert, publish, download, list, import-official).
COMMAND_MODULES = ("moco_zoo.data.cli", "moco_zoo.zoo_cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moco-zoo", description=__doc__.splitlines()[0] if __doc__ else None)
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
    except (ValueError, FileNotFoundError, FileExistsError, OSError) as e:
        # Library errors name the file and the problem; show them without a traceback.
        print(f"moco-zoo {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
