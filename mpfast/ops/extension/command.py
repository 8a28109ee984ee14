"""``mpfast build``: compile the C++ (and CUDA) libraries ahead of time and print where."""

from __future__ import annotations

import argparse
import sys
import time

from .._registry import BackendUnavailableError
from .library import build
from .toolchain import cuda_home, metadata_path


def _build_command(args: argparse.Namespace) -> int:
    kinds = ["cpp", "cuda"] if args.kind == "all" else [args.kind]
    if args.kind == "auto":
        kinds = ["cpp"] + (["cuda"] if cuda_home() is not None else [])
        if "cuda" not in kinds:
            print("mpfast build: nvcc not found (CUDA_HOME unset); building the C++ extension only")
    status = 0
    for kind in kinds:
        start = time.perf_counter()
        try:
            path = build(kind, verbose=args.compiler_output or getattr(args, "verbose", False), force=args.force)
        except BackendUnavailableError as exc:
            print(f"mpfast build: {kind} extension not built: {exc}", file=sys.stderr)
            status = 1
            continue
        print(f"{kind}: {path} ({time.perf_counter() - start:.0f} s; metadata {metadata_path(path)})")
    return status


def add_commands(subparsers) -> None:
    """Adds ``mpfast build`` (compile the C++/CUDA extensions ahead of time)."""
    parser = subparsers.add_parser("build", help="compile the C++ (and CUDA) extensions now and print where")
    parser.add_argument("--kind", choices=("auto", "cpp", "cuda", "all"), default="auto",
                        help="which extension; auto: C++, plus CUDA when nvcc is found (default)")
    parser.add_argument("--force", action="store_true", help="recompile from scratch")
    parser.add_argument("-V", "--compiler-output", dest="compiler_output", action="store_true",
                        help="show compiler commands and output")
    parser.set_defaults(func=_build_command)
