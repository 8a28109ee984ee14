"""Finding, compiling and loading the compiled libraries (see the package docstring for the order)."""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import torch

from .._registry import BackendUnavailableError
from . import toolchain
from .toolchain import check_kind, library_name, metadata_path

logger = logging.getLogger("mpfast.ops")

_lock = threading.Lock()
_loaded: dict[str, Path] = {}


def cache_root() -> Path:
    """Where on-demand builds go: ``$MPFAST_CACHE_DIR``, else ``$TORCH_EXTENSIONS_DIR/mpfast``,
    else ``~/.cache/mpfast`` (``$XDG_CACHE_HOME``)."""
    if os.environ.get("MPFAST_CACHE_DIR"):
        return Path(os.environ["MPFAST_CACHE_DIR"]).expanduser()
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"]).expanduser() / "mpfast"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "mpfast"


def build_dir(kind: str) -> Path:
    """The cache folder of the library built from the current sources, flags and versions."""
    meta = toolchain.expected_metadata(kind)
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
    return cache_root() / f"{library_name(kind)}-{key}"


def prebuilt_dir() -> Path:
    """Where ``setup.py`` puts libraries built at install time: ``mpfast/_ext``."""
    return toolchain.PACKAGE_DIR / "_ext"


def check_metadata(library: Path, kind: str) -> dict:
    """Reads a library's build metadata; raises :class:`BackendUnavailableError` unless it fits this torch/Python."""
    meta_file = metadata_path(library)
    if library.parent == prebuilt_dir():
        rebuild = ("rebuild it (MPFAST_BUILD_EXT=1 pip install --no-build-isolation -e .) "
                   "or delete it to compile on first use")
    else:
        rebuild = "rebuild it with `mpfast build --force`"
    if not meta_file.is_file():
        raise BackendUnavailableError(f"{library} has no build metadata ({meta_file.name}); {rebuild}")
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as exc:
        raise BackendUnavailableError(f"cannot read the build metadata {meta_file}: {exc}; {rebuild}") from exc
    here = toolchain.version_metadata(kind)
    for key, what in (("kind", "kind"), ("torch", "torch"), ("torch_cuda", "torch CUDA"), ("python", "Python")):
        if meta.get(key) != here[key]:
            raise BackendUnavailableError(
                f"{library} was built for {what} {meta.get(key)} but this is {what} {here[key]}; {rebuild}"
            )
    return meta


def _prebuilt(kind: str) -> Path | None:
    folder = prebuilt_dir()
    found = sorted(folder.glob(f"{library_name(kind)}*.so")) if folder.is_dir() else []
    return found[0] if found else None


def _cached(kind: str) -> Path | None:
    library = build_dir(kind) / f"{library_name(kind)}.so"
    return library if library.is_file() and metadata_path(library).is_file() else None


def not_built_reason(kind: str) -> str | None:
    """Why :func:`load` would have to compile the ``kind`` library, or ``None`` when it
    is loaded or built (prebuilt, or in the cache). Never compiles anything."""
    check_kind(kind)
    if library_name(kind) in _loaded:
        return None
    try:
        if _prebuilt(kind) is not None or _cached(kind) is not None:
            return None
    except (OSError, ValueError) as exc:  # sources missing, bad TORCH_CUDA_ARCH_LIST
        return f"{type(exc).__name__}: {exc}"
    missing = toolchain.missing_tool(kind)
    if missing:
        return f"not built, and cannot be built here: {missing}"
    return f"not built - run `mpfast build` (or it compiles on first use, about a minute, into {cache_root()})"


def build(kind: str, verbose: bool = False, force: bool = False) -> Path:
    """Compiles a backend's library into the cache (if needed) and loads it.

    Args:
        kind: ``"cpp"`` or ``"cuda"``.
        verbose: show the compiler commands and output.
        force: delete this build's folder first and compile from scratch.

    Returns:
        Path of the shared library.

    Raises:
        BackendUnavailableError: no compiler/ninja/nvcc, or compilation failed (the message says why).
    """
    check_kind(kind)
    folder = build_dir(kind)
    library = folder / f"{library_name(kind)}.so"
    with _lock:
        if force and folder.exists():
            if library_name(kind) in _loaded:
                raise BackendUnavailableError(
                    f"the {kind} extension is loaded in this process; rebuild it in a new one")
            shutil.rmtree(folder)
        if library.is_file() and metadata_path(library).is_file():
            check_metadata(library, kind)
            return _load_library(library, kind)
        missing = toolchain.missing_tool(kind)
        if missing:
            raise BackendUnavailableError(missing)
        _check_earlier_failure(kind, folder)
        folder.mkdir(parents=True, exist_ok=True)
        logger.warning("mpfast: compiling the %s extension into %s (first use; about a minute)", kind, folder)
        start = time.perf_counter()
        try:
            path = _compile(kind, folder, verbose)
        except Exception as exc:  # the compiler's message, whatever cpp_extension wraps it in
            log = _record_failure(kind, folder, f"{type(exc).__name__}: {exc}")
            raise BackendUnavailableError(
                f"compiling the mpfast {kind} extension failed: {_first_error(str(exc))}; full log: {log}; "
                f"fix the cause, then `mpfast build --force` retries"
            ) from exc
        seconds = time.perf_counter() - start
        toolchain.write_metadata(path, kind, seconds)
        logger.warning("mpfast: built %s in %.0f s", path, seconds)
        _loaded[library_name(kind)] = path
        return path


def _first_error(text: str, limit: int = 240) -> str:
    """The compiler's first error line (else the last line), shortened: the whole output goes to the log."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower() and not line.lower().startswith("error building")]
    line = (errors or lines or ["no output"])[0]
    return line if len(line) <= limit else line[: limit - 3] + "..."


_FAILURE_FILE = "build-failed.json"  # in the build folder: a failed build is not retried until --force


def _compiler_versions(kind: str) -> dict:
    """Versions of the compilers a build of ``kind`` uses (the build folder's key holds sources, flags, torch)."""
    home = toolchain.cuda_home()
    compilers = [os.environ.get("CXX", "c++")]
    if kind == "cuda" and home is not None:
        compilers.append(str(home / "bin" / "nvcc"))
    versions = {}
    for compiler in compilers:
        try:
            out = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
        except (OSError, subprocess.SubprocessError) as exc:
            out = f"unavailable: {exc}"
        versions[compiler] = out.strip()
    return versions


def _record_failure(kind: str, folder: Path, output: str) -> Path:
    """Writes the whole compiler output to ``build.log`` and remembers the failure; returns the log's path."""
    log = folder / "build.log"
    log.write_text(output + "\n")
    record = {"log": str(log), "toolchain": _compiler_versions(kind),
              "at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    (folder / _FAILURE_FILE).write_text(json.dumps(record, indent=1) + "\n")
    return log


def _check_earlier_failure(kind: str, folder: Path) -> None:
    """Raises when these sources, flags and compilers failed to build before (``mpfast build --force`` retries)."""
    record_file = folder / _FAILURE_FILE
    if not record_file.is_file():
        return
    try:
        record = json.loads(record_file.read_text())
    except (OSError, ValueError):
        return
    if record.get("toolchain") == _compiler_versions(kind):
        raise BackendUnavailableError(
            f"the {kind} extension failed to build with these sources and compilers at {record.get('at')} "
            f"(log: {record.get('log')}); not retried: fix the cause, then `mpfast build --force`"
        )


def _compile(kind: str, folder: Path, verbose: bool) -> Path:
    from torch.utils import cpp_extension

    flags = toolchain.build_flags(kind)
    env_backup = {}
    if kind == "cuda":
        # cpp_extension reads CUDA_HOME when imported; -gencode flags above stop it probing the GPU.
        env_backup["CUDA_HOME"] = os.environ.get("CUDA_HOME")
        os.environ["CUDA_HOME"] = str(toolchain.cuda_home())
    try:
        cpp_extension.load(
            name=library_name(kind),
            sources=[str(p) for p in toolchain.sources(kind)],
            extra_cflags=flags["cxx"],
            extra_cuda_cflags=flags.get("nvcc"),
            extra_ldflags=flags["ld"],
            extra_include_paths=[str(toolchain.source_dir())],
            build_directory=str(folder),
            verbose=verbose,
            with_cuda=kind == "cuda",
            is_python_module=False,
        )
    finally:
        for key, value in env_backup.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return folder / f"{library_name(kind)}.so"


def _load_library(library: Path, kind: str) -> Path:
    name = library_name(kind)
    if name in _loaded:
        if _loaded[name] != library:
            raise BackendUnavailableError(f"{name} is already loaded from {_loaded[name]}; cannot also load {library}")
        return library
    torch.ops.load_library(str(library))
    _loaded[name] = library
    return library


def load(kind: str) -> Path:
    """Loads a backend's library (prebuilt, cached, or compiled now); returns its path.

    Raises:
        BackendUnavailableError: it cannot be loaded or built here (the message says why).
    """
    check_kind(kind)
    name = library_name(kind)
    if name in _loaded:
        return _loaded[name]
    prebuilt = _prebuilt(kind)
    if prebuilt is not None:
        check_metadata(prebuilt, kind)
        with _lock:
            return _load_library(prebuilt, kind)
    try:
        return build(kind)
    except FileNotFoundError as exc:  # the sources are not installed
        raise BackendUnavailableError(str(exc)) from exc


def load_namespace(kind: str):
    """``torch.ops.mpfast_cpp`` / ``torch.ops.mpfast_cuda``, its library loaded (or built) first."""
    load(kind)
    return getattr(torch.ops, library_name(kind))
