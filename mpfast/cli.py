"""The ``mpfast`` command line.

Each group of subcommands lives beside the code it drives, in a module with an
``add_commands(subparsers)`` function that adds its parsers and sets ``func`` on each
(called with the parsed arguments; its return value is the exit code). This module
holds what every command shares: the parser class (one-line usage errors, every
option's default in ``--help``), checked numeric argument types, logging set-up and
the exit-code convention.

Exit codes: 0 success; 2 the command line or its input is wrong (a bad flag or
value, a missing or malformed file, a video that cannot be read); 1 the command could
not complete (a runtime failure: out of memory, a failed build, a non-finite loss...);
130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import math
import sys
import traceback
from typing import Callable

# Modules that add subcommands (each defines ``add_commands(subparsers)``).
COMMAND_MODULES: tuple[str, ...] = ("mpfast.engine.commands", "mpfast.profiling.commands", "mpfast.ops.extension")

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
EXIT_CODES_HELP = (
    "exit codes: 0 success; 2 usage or input error (bad flag or value, missing or malformed file, unreadable "
    "video); 1 runtime error (the command could not complete); 130 interrupted (Ctrl-C). "
    "Errors are one line; `mpfast -v COMMAND ...` also prints the traceback."
)


class UsageError(ValueError):
    """A flag or a combination of flags the command cannot use (exit code 2)."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with a line saying what was kept and how to continue (exit code 130)."""


def input_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean the command line or its input is wrong (exit code 2)."""
    from .data.video import VideoDecodeError

    return (ValueError, TypeError, LookupError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
            VideoDecodeError)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds ``(default: ...)`` to every option whose help does not already state one.

    Flags (default False) and options without a default (None, empty) are left alone:
    their help says what happens when they are not given.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, False, [], argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line (exit code 2), with defaults in ``--help``."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _number(text: str, kind: type, what: str, ok: Callable[[float], bool]):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not (math.isfinite(value) and ok(value)):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer ``>= minimum`` (the error names the flag and the value)."""

    def parse(text: str) -> int:
        return _number(text, int, f"an integer >= {minimum}", lambda v: v >= minimum)

    parse.__name__ = f"int>={minimum}"
    return parse


positive_int = int_at_least(1)
nonnegative_int = int_at_least(0)


def positive_float(text: str) -> float:
    """An argparse ``type``: a finite number > 0."""
    return _number(text, float, "a finite number > 0", lambda v: v > 0)


def nonnegative_float(text: str) -> float:
    """An argparse ``type``: a finite number >= 0."""
    return _number(text, float, "a finite number >= 0", lambda v: v >= 0)


def _version() -> str:
    import open_clip
    import torch

    from . import __version__

    return f"mpfast {__version__} (torch {torch.__version__}, open_clip {open_clip.__version__})"


class _VersionAction(argparse.Action):
    """``--version``: prints versions without importing torch for every other command's parse."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(_version())
        parser.exit(EXIT_OK)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="mpfast", description="Motion-prompted CLIP video recognition, fast.",
                    epilog=EXIT_CODES_HELP)
    parser.add_argument("--version", action=_VersionAction, help="print the versions of mpfast, torch and open_clip")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log mpfast's progress messages and print tracebacks; -vv also logs other libraries")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    info = subparsers.add_parser("info", help="versions and available backends", epilog=EXIT_CODES_HELP)
    info.set_defaults(func=lambda args: __import__("mpfast.info").info.main())
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(subparsers)
    for command in subparsers.choices.values():
        command.epilog = command.epilog or EXIT_CODES_HELP
    return parser


def configure_logging(verbose: int) -> None:
    """WARNING for everything; ``-v``: mpfast's INFO messages; ``-vv``: every library's (open_clip logs to root)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(logging.INFO if verbose >= 2 else logging.WARNING)
    logging.getLogger("mpfast").setLevel(logging.INFO if verbose >= 1 else logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # usage errors (2), --help and --version (0): return the code, as commands do
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    configure_logging(args.verbose)
    prefix = f"mpfast {args.command}"
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt as exc:
        print(f"{prefix}: interrupted{': ' + str(exc) if str(exc) else ''}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # a one-line message for the user; -v adds the traceback
        code = EXIT_USAGE if isinstance(exc, input_errors()) else EXIT_RUNTIME
        if args.verbose:
            traceback.print_exc()
        hint = "" if args.verbose else f" (run `mpfast -v {args.command} ...` for the traceback)"
        message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
        print(f"{prefix}: error: {message}{hint}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
