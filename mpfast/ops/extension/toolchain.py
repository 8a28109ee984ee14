"""What a build of the compiled backends is made of, and the record kept beside it.

Sources, compiler flags, CUDA architectures, the toolchain (compiler, ninja, nvcc), the
build metadata (``<library>.json``) and the nvcc commands CI runs. Shared by on-demand
builds (:mod:`.library`), ``mpfast build`` and ``setup.py``, so the three compile the same
thing the same way.

This module imports only the standard library and torch: ``setup.py`` loads it by path,
before mpfast's dependencies (open_clip, ...) may be installed. Nothing here probes the GPU.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

KINDS = ("cpp", "cuda")
HEADERS = ("mpfast.h", "dispatch.h", "cpu_utils.h", "cpu_attention.h", "cuda_utils.cuh", "bindings.cpp")
SOURCES = {
    "cpp": ("bindings.cpp", "temporal_diff.cpp", "motion_mix.cpp", "prompt_attention.cpp", "class_logits.cpp"),
    "cuda": ("bindings_cuda.cpp", "temporal_diff.cu", "motion_mix.cu", "prompt_attention.cu", "class_logits.cu"),
}
CXX_FLAGS = ("-O3", "-fopenmp", "-ffp-contract=fast", "-fno-math-errno", "-Wno-psabi")
LD_FLAGS = ("-fopenmp",)
NVCC_FLAGS = ("-O3", "--expt-relaxed-constexpr", "-lineinfo")
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0"
PACKAGE_DIR = Path(__file__).resolve().parents[2]  # .../mpfast


def check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def library_name(kind: str) -> str:
    """``mpfast_cpp`` or ``mpfast_cuda``: the library's file stem and torch.ops namespace."""
    check_kind(kind)
    return f"mpfast_{kind}"


def source_dir() -> Path:
    """Folder of the C++/CUDA sources: ``csrc/`` of a source checkout (or ``mpfast/csrc``).

    Raises:
        FileNotFoundError: the sources are not installed (the message says what to do).
    """
    for candidate in (PACKAGE_DIR.parent / "csrc", PACKAGE_DIR / "csrc"):
        if (candidate / "bindings.cpp").is_file():
            return candidate
    raise FileNotFoundError(
        f"the C++/CUDA sources are not installed (looked for csrc/ beside {PACKAGE_DIR}); "
        "install mpfast from a source checkout or build the extensions ahead of time "
        "(MPFAST_BUILD_EXT=1 pip install --no-build-isolation .)"
    )


def sources(kind: str) -> list[Path]:
    """Translation units of a backend's library."""
    check_kind(kind)
    root = source_dir()
    return [root / name for name in SOURCES[kind]]


def cuda_home() -> Path | None:
    """The CUDA toolkit with an nvcc (``$CUDA_HOME``, ``$CUDA_PATH``, else nvcc on ``PATH``), or ``None``."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            home = Path(os.environ[var])
            return home if (home / "bin" / "nvcc").is_file() else None
    nvcc = shutil.which("nvcc")
    return Path(nvcc).resolve().parent.parent if nvcc else None


def missing_tool(kind: str) -> str | None:
    """What is missing to compile the ``kind`` library here (compiler, ninja, nvcc), or ``None``."""
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler found to build the {kind} extension ({compiler!r} is not on PATH; set CXX)"
    if shutil.which("ninja") is None:
        try:
            import ninja  # noqa: F401  (the pip package puts the binary beside the interpreter)
        except ImportError:
            return f"ninja is not installed (needed to build the {kind} extension): pip install ninja"
    if kind == "cuda" and cuda_home() is None:
        return "nvcc not found (set CUDA_HOME to a CUDA toolkit) to build the CUDA extension"
    return None


def cuda_arch_list() -> str:
    """``$TORCH_CUDA_ARCH_LIST``, else ``8.0;9.0``."""
    return os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_CUDA_ARCH_LIST


def cuda_arch_flags() -> list[str]:
    """``-gencode`` flags for :func:`cuda_arch_list`, e.g. ``9.0+PTX`` adds PTX for sm_90."""
    arch_list = cuda_arch_list()
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
    check_kind(kind)
    flags = {"cxx": list(CXX_FLAGS), "ld": list(LD_FLAGS)}
    if kind == "cuda":
        flags["nvcc"] = list(NVCC_FLAGS) + cuda_arch_flags()
    return flags


# ---- build metadata ---------------------------------------------------------------------

def version_metadata(kind: str) -> dict:
    """The versions a library must have been built for to load here."""
    return {
        "kind": kind,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
    }


def expected_metadata(kind: str) -> dict:
    """What a library of ``kind`` built here now would record (versions, flags, sources)."""
    meta = {
        "name": library_name(kind),
        **version_metadata(kind),
        "cxx11_abi": bool(torch.compiled_with_cxx11_abi()),
        "flags": build_flags(kind),
        "sources_sha256": _source_hash(kind),
    }
    if kind == "cuda":
        meta["cuda_arch_list"] = cuda_arch_list()
    return meta


def _source_hash(kind: str) -> str:
    digest = hashlib.sha256()
    root = source_dir()
    for name in sorted(set(SOURCES[kind]) | set(HEADERS)):
        path = root / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def metadata_path(library: Path) -> Path:
    """``<dir>/mpfast_cpp.json`` beside ``<dir>/mpfast_cpp(.cpython-...).so``."""
    library = Path(library)
    return library.parent / (library.name.split(".")[0] + ".json")


def write_metadata(library: Path, kind: str, seconds: float | None = None) -> Path:
    """Records the build metadata of ``library`` beside it."""
    meta = expected_metadata(kind)
    meta["library"] = Path(library).name
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


# ---- CI: the CUDA sources compiled to objects, no GPU needed ----------------------------

def cuda_object_commands(out_dir: Path) -> list[list[str]]:
    """Commands that compile every CUDA-build translation unit to an object file in ``out_dir``.

    The flags are those of the builds (plus what ``torch.utils.cpp_extension`` adds); CI
    runs them to catch CUDA compile errors on machines without a GPU.

    Raises:
        FileNotFoundError: no nvcc (set ``CUDA_HOME``).
    """
    from torch.utils import cpp_extension

    home = cuda_home()
    if home is None:
        raise FileNotFoundError("nvcc not found (set CUDA_HOME to a CUDA toolkit)")
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
