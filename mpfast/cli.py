"""The ``mpfast`` command line.

Each group of subcommands lives beside the code it drives, in a module with an
``add_commands(subparsers)`` function that adds its parsers and sets ``func`` on each
(called with the parsed arguments; its return value is the exit code).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Modules that add subcommands (each defines ``add_commands(subparsers)``).
COMMAND_MODULES: tuple[str, ...] = ("mpfast.engine.commands", "mpfast.profiling.commands", "mpfast.ops.extension")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mpfast", description="Motion-prompted CLIP video recognition, fast.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    info = subparsers.add_parser("info", help="versions and available backends")
    info.set_defaults(func=lambda args: __import__("mpfast.info").info.main())
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except Exception as exc:  # a one-line message for the user; -v shows the traceback
        if args.verbose:
            raise
        print(f"mpfast {args.command}: error: {exc}\n(run `mpfast -v {args.command} ...` for the traceback)",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
