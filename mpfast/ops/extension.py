"""The compiled backends: C++ (CPU) and CUDA kernels from ``csrc/``, built with ninja.

Each backend is one shared library that registers its kernels as torch operators
(``torch.ops.mpfast_cpp.*``, ``torch.ops.mpfast_cuda.*``; see ``csrc/bindings.cpp``).
:func:`load` finds it, in this order:

1. built ahead of time by ``setup.py`` (``MPFAST_BUILD_EXT=1 pip install
   --no-build-isolation -e .``): ``mpfast/_ext/mpfast_<kind>*.so``;
2. compiled before, in the cache: ``$MPFAST_CACHE_DIR``, else
   ``$TORCH_EXTENSIONS_DIR/mpfast``, else ``~/.cache/mpfast`` (``$XDG_CACHE_HOME``), one
   folder per set of sources, flags, torch and Python versions;
3. otherwise compiled there now with ``torch.utils.cpp_extension`` and ninja (logged;
   about a minute on two cores), or ahead of time with ``mpfast build``.

Every library has its build metadata beside it (``<name>.json``: torch, CUDA and
Python versions, flags, architectures, source hash); a library built for another torch
or Python is refused with a message saying how to rebuild. A missing compiler, ninja
or nvcc makes the backend unavailable with that reason (``python -m mpfast.info``), so
``auto`` falls back to the reference.

CUDA sources are compiled only when nvcc is found (``$CUDA_HOME`` or ``PATH``), for the
architectures in ``$TORCH_CUDA_ARCH_LIST`` (default ``8.0;9.0``); nothing probes the GPU.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Mapping, Sequence

import torch

from . import _common
from ._registry import BackendUnavailableError, OpImpl

logger = logging.getLogger("mpfast.ops")

KINDS = ("cpp", "cuda")
_HEADERS = ("mpfast.h", "cpu_utils.h", "cuda_utils.cuh", "bindings.cpp")
_SOURCES = {
    "cpp": ("bindings.cpp", "temporal_diff.cpp", "motion_mix.cpp", "prompt_attention.cpp"),
    "cuda": ("bindings_cuda.cpp", "temporal_diff.cu", "motion_mix.cu", "prompt_attention.cu"),
}
_CXX_FLAGS = ("-O3", "-fopenmp", "-ffp-contract=fast", "-fno-math-errno", "-Wno-psabi")
_LD_FLAGS = ("-fopenmp",)
_NVCC_FLAGS = ("-O3", "--expt-relaxed-constexpr", "-lineinfo")
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0"
_PACKAGE_DIR = Path(__file__).resolve().parent.parent  # .../mpfast

_lock = threading.Lock()
_loaded: dict[str, Path] = {}


def library_name(kind: str) -> str:
    """``mpfast_cpp`` or ``mpfast_cuda``: the library's file stem and torch.ops namespace."""
    _check_kind(kind)
    return f"mpfast_{kind}"


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def source_dir() -> Path:
    """Folder of the C++/CUDA sources: ``csrc/`` of a source checkout (or ``mpfast/csrc``)."""
    for candidate in (_PACKAGE_DIR.parent / "csrc", _PACKAGE_DIR / "csrc"):
        if (candidate / "bindings.cpp").is_file():
            return candidate
    raise BackendUnavailableError(
        f"the C++/CUDA sources are not installed (looked for csrc/ beside {_PACKAGE_DIR}); "
        "install mpfast from a source checkout or build the extensions ahead of time "
        "(MPFAST_BUILD_EXT=1 pip install --no-build-isolation .)"
    )


def sources(kind: str) -> list[Path]:
    """Translation units of a backend's library."""
    _check_kind(kind)
    root = source_dir()
    return [root / name for name in _SOURCES[kind]]


def cache_root() -> Path:
    """Where on-demand builds go (see the module docstring)."""
    if os.environ.get("MPFAST_CACHE_DIR"):
        return Path(os.environ["MPFAST_CACHE_DIR"]).expanduser()
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"]).expanduser() / "mpfast"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "mpfast"


def cuda_home() -> Path | None:
    """The CUDA toolkit with an nvcc (``$CUDA_HOME``, ``$CUDA_PATH``, else nvcc on ``PATH``), or ``None``."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            home = Path(os.environ[var])
            return home if (home / "bin" / "nvcc").is_file() else None
    nvcc = shutil.which("nvcc")
    return Path(nvcc).resolve().parent.parent if nvcc else None


def cuda_arch_flags() -> list[str]:
    """``-gencode`` flags for ``$TORCH_CUDA_ARCH_LIST`` (default ``8.0;9.0``), e.g. ``9.0+PTX``."""
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_CUDA_ARCH_LIST
    flags = []
    for arch in arch_list.replace(",", ";").replace(" ", ";").split(";"):
        if not arch:
            continue
        ptx = arch.endswith("+PTX")
        number = arch.removesuffix("+PTX")
        try:
            major, minor = number.split(".")
            sm = f"{int(major)}{minor}"
        except ValueError:
            raise ValueError(f"TORCH_CUDA_ARCH_LIST entries must look like 8.0 or 9.0+PTX, got {arch!r}") from None
        flags.append(f"-gencode=arch=compute_{sm},code=sm_{sm}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{sm},code=compute_{sm}")
    if not flags:
        raise ValueError(f"TORCH_CUDA_ARCH_LIST names no architecture: {arch_list!r}")
    return flags


def build_flags(kind: str) -> dict[str, list[str]]:
    """Compiler flags of a backend: ``cxx``, ``nvcc`` (CUDA only) and ``ld``."""
    _check_kind(kind)
    flags = {"cxx": list(_CXX_FLAGS), "ld": list(_LD_FLAGS)}
    if kind == "cuda":
        flags["nvcc"] = list(_NVCC_FLAGS) + cuda_arch_flags()
    return flags


def _source_hash(kind: str) -> str:
    digest = hashlib.sha256()
    root = source_dir()
    for name in sorted(set(_SOURCES[kind]) | set(_HEADERS)):
        path = root / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def expected_metadata(kind: str) -> dict:
    """What a library of ``kind`` built here now would record (versions, flags, sources)."""
    meta = {
        "name": library_name(kind),
        "kind": kind,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "cxx11_abi": bool(torch.compiled_with_cxx11_abi()),
        "flags": build_flags(kind),
        "sources_sha256": _source_hash(kind),
    }
    if kind == "cuda":
        meta["cuda_arch_list"] = os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_CUDA_ARCH_LIST
    return meta


def build_dir(kind: str) -> Path:
    """The cache folder of the library built from the current sources, flags and versions."""
    meta = expected_metadata(kind)
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
    return cache_root() / f"{library_name(kind)}-{key}"


def metadata_path(library: Path) -> Path:
    """``<dir>/mpfast_cpp.json`` beside ``<dir>/mpfast_cpp(.cpython-...).so``."""
    return library.parent / (library.name.split(".")[0] + ".json")


def check_metadata(library: Path, kind: str) -> dict:
    """Reads a library's build metadata; raises :class:`BackendUnavailableError` unless it fits this torch/Python."""
    meta_file = metadata_path(library)
    if library.parent == _prebuilt_dir():
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
    here = _version_metadata(kind)
    for key, what in (("kind", "kind"), ("torch", "torch"), ("torch_cuda", "torch CUDA"), ("python", "Python")):
        if key in here and meta.get(key) != here[key]:
            raise BackendUnavailableError(
                f"{library} was built for {what} {meta.get(key)} but this is {what} {here[key]}; {rebuild}"
            )
    return meta


def _version_metadata(kind: str) -> dict:
    return {
        "kind": kind,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
    }


def write_metadata(library: Path, kind: str, seconds: float | None = None) -> Path:
    """Records the build metadata of ``library`` beside it."""
    meta = expected_metadata(kind)
    meta["library"] = library.name
    meta["built_at"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    if seconds is not None:
        meta["build_seconds"] = round(seconds, 1)
    if kind == "cuda":
        meta["nvcc"] = _nvcc_version()
    path = metadata_path(library)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def _nvcc_version() -> str | None:
    home = cuda_home()
    if home is None:
        return None
    try:
        out = subprocess.run([str(home / "bin" / "nvcc"), "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [line for line in out.stdout.splitlines() if "release" in line]
    return lines[-1].strip() if lines else None


def _prebuilt_dir() -> Path:
    return _PACKAGE_DIR / "_ext"


def _find_library(folder: Path, kind: str) -> Path | None:
    if not folder.is_dir():
        return None
    found = sorted(folder.glob(f"{library_name(kind)}*.so"))
    return found[0] if found else None


def _check_toolchain(kind: str) -> None:
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise BackendUnavailableError(f"no C++ compiler found to build the {kind} extension ({compiler!r} is not on PATH; set CXX)")
    if shutil.which("ninja") is None:
        try:
            import ninja  # noqa: F401  (the pip package puts the binary beside the interpreter)
        except ImportError:
            raise BackendUnavailableError(f"ninja is not installed (needed to build the {kind} extension): pip install ninja") from None
    if kind == "cuda" and cuda_home() is None:
        raise BackendUnavailableError("nvcc not found (set CUDA_HOME to a CUDA toolkit) to build the CUDA extension")


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
    _check_kind(kind)
    folder = build_dir(kind)
    library = folder / f"{library_name(kind)}.so"
    with _lock:
        if force and folder.exists():
            if library_name(kind) in _loaded:
                raise BackendUnavailableError(f"the {kind} extension is loaded in this process; rebuild it in a new one")
            shutil.rmtree(folder)
        if library.is_file() and metadata_path(library).is_file():
            check_metadata(library, kind)
            return _load_library(library, kind)
        _check_toolchain(kind)
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
        write_metadata(path, kind, seconds)
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


def _toolchain(kind: str) -> dict:
    """Versions of the compilers a build of ``kind`` uses (the build folder's key holds sources, flags, torch)."""
    compilers = [os.environ.get("CXX", "c++")] + ([str(cuda_home() / "bin" / "nvcc")] if kind == "cuda" else [])
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
    record = {"log": str(log), "toolchain": _toolchain(kind),
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
    if record.get("toolchain") == _toolchain(kind):
        raise BackendUnavailableError(
            f"the {kind} extension failed to build with these sources and compilers at {record.get('at')} "
            f"(log: {record.get('log')}); not retried: fix the cause, then `mpfast build --force`"
        )


def _compile(kind: str, folder: Path, verbose: bool) -> Path:
    from torch.utils import cpp_extension

    flags = build_flags(kind)
    env_backup = {}
    if kind == "cuda":
        # cpp_extension reads CUDA_HOME when imported; -gencode flags above stop it probing the GPU.
        env_backup["CUDA_HOME"] = os.environ.get("CUDA_HOME")
        os.environ["CUDA_HOME"] = str(cuda_home())
    try:
        cpp_extension.load(
            name=library_name(kind),
            sources=[str(p) for p in sources(kind)],
            extra_cflags=flags["cxx"],
            extra_cuda_cflags=flags.get("nvcc"),
            extra_ldflags=flags["ld"],
            extra_include_paths=[str(source_dir())],
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
    _check_kind(kind)
    name = library_name(kind)
    if name in _loaded:
        return _loaded[name]
    prebuilt = _find_library(_prebuilt_dir(), kind)
    if prebuilt is not None:
        check_metadata(prebuilt, kind)
        with _lock:
            return _load_library(prebuilt, kind)
    return build(kind)


def _ops(namespace) -> dict[str, OpImpl]:
    """Python wrappers with the reference signatures: allocate outputs (poisonable), call the kernels."""
    # OpOverload objects: calling them skips the overload resolution of torch.ops packets.
    temporal_diff_fwd = namespace.temporal_diff_fwd.default
    temporal_diff_bwd = namespace.temporal_diff_bwd.default
    motion_mix_fwd = namespace.motion_mix_fwd.default
    motion_mix_bwd = namespace.motion_mix_bwd.default
    prompt_attention_fwd = namespace.prompt_attention_fwd.default
    prompt_attention_bwd = namespace.prompt_attention_bwd.default
    new_output = _common.new_output

    def temporal_diff(x, strides):
        out = new_output((x.shape[0], len(strides), *x.shape[1:]), x)
        temporal_diff_fwd(x, list(strides), out)
        return out

    def temporal_diff_backward(grad, strides):
        grad_x = new_output((grad.shape[0], *grad.shape[2:]), grad)
        temporal_diff_bwd(grad, list(strides), grad_x)
        return grad_x

    def motion_mix(h, m, gate):
        u = new_output(h.shape, h)
        v = new_output((h.shape[0], h.shape[2]), h)
        mu = new_output((h.shape[0], h.shape[2]), h)
        motion_mix_fwd(h, m, gate, u, v, mu)
        return u, v, mu

    def motion_mix_backward(grad_u, grad_v, grad_mu, h, m, gate):
        grad_h, grad_m, grad_gate = (new_output(t.shape, h) for t in (h, m, gate))
        motion_mix_bwd(grad_u, grad_v, grad_mu, h, m, gate, grad_h, grad_m, grad_gate)
        return grad_h, grad_m, grad_gate

    def prompt_attention(q, k, v, scale, key_padding_mask=None):
        out = new_output((k.shape[0], *q.shape[-3:]), q)
        prompt_attention_fwd(q, k, v, float(scale), key_padding_mask, out)
        return out

    def prompt_attention_backward(grad_out, q, k, v, scale, key_padding_mask=None):
        grad_q, grad_k, grad_v = (new_output(t.shape, q) for t in (q, k, v))
        prompt_attention_bwd(grad_out, q, k, v, float(scale), key_padding_mask, grad_q, grad_k, grad_v)
        return grad_q, grad_k, grad_v

    return {
        "temporal_diff": OpImpl(temporal_diff, temporal_diff_backward),
        "motion_mix": OpImpl(motion_mix, motion_mix_backward),
        "prompt_attention": OpImpl(prompt_attention, prompt_attention_backward),
    }


def load_ops(kind: str) -> Mapping[str, OpImpl]:
    """The registry loader of the ``cpp`` / ``cuda`` backend: ``{op_name: OpImpl}``."""
    load(kind)
    return _ops(getattr(torch.ops, library_name(kind)))


def cuda_object_commands(out_dir: Path) -> list[list[str]]:
    """Commands that compile every CUDA-build translation unit to an object file in ``out_dir``.

    The flags are those of :func:`build` (plus what ``torch.utils.cpp_extension`` adds);
    CI runs them to catch CUDA compile errors on machines without a GPU.
    """
    from torch.utils import cpp_extension

    home = cuda_home()
    if home is None:
        raise BackendUnavailableError("nvcc not found (set CUDA_HOME to a CUDA toolkit)")
    flags = build_flags("cuda")
    includes = [f"-I{p}" for p in cpp_extension.include_paths(device_type="cuda")]
    includes += [f"-I{home / 'include'}", f"-I{source_dir()}"]
    abi = [f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}"]
    commands = []
    for src in sources("cuda"):
        obj = str(Path(out_dir) / (src.name + ".o"))
        if src.suffix == ".cu":
            commands.append(
                [str(home / "bin" / "nvcc"), *includes, *abi, *cpp_extension.COMMON_NVCC_FLAGS, *flags["nvcc"],
                 "-std=c++20", "-Xcompiler", "-fPIC", "-c", str(src), "-o", obj]
            )
        else:
            commands.append([os.environ.get("CXX", "c++"), *includes, *abi, *flags["cxx"], "-std=c++20", "-fPIC",
                             "-c", str(src), "-o", obj])
    return commands


def _build_command(args: argparse.Namespace) -> int:
    verbose = args.compiler_output or getattr(args, "verbose", False)
    kinds = ["cpp", "cuda"] if args.kind == "all" else [args.kind]
    if args.kind == "auto":
        kinds = ["cpp"] + (["cuda"] if cuda_home() is not None else [])
        if "cuda" not in kinds:
            print("mpfast build: nvcc not found (CUDA_HOME unset); building the C++ extension only")
    status = 0
    for kind in kinds:
        start = time.perf_counter()
        try:
            path = build(kind, verbose=verbose, force=args.force)
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


def _main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mpfast.ops.extension")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(_main())
