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

Asking never compiles: :func:`not_built_reason` (what ``available_backends()`` and
``python -m mpfast.info`` report) says "not built - run `mpfast build`" instead.

Every library has its build metadata beside it (``<name>.json``: torch, CUDA and
Python versions, flags, architectures, source hash); a library built for another torch
or Python is refused with a message saying how to rebuild. A missing compiler, ninja
or nvcc makes the backend unavailable with that reason, so ``auto`` falls back to the
reference.

CUDA sources are compiled only when nvcc is found (``$CUDA_HOME`` or ``PATH``), for the
architectures in ``$TORCH_CUDA_ARCH_LIST`` (default ``8.0;9.0``); nothing probes the GPU.

Modules: :mod:`.toolchain` (sources, flags, architectures, compilers, build metadata, the
CI nvcc commands; needs only torch, ``setup.py`` uses it), :mod:`.library` (find, compile,
load), :mod:`.command` (``mpfast build``).
"""

from .command import add_commands
from .library import build, build_dir, cache_root, check_metadata, load, load_namespace, not_built_reason, prebuilt_dir
from .toolchain import (
    KINDS,
    build_flags,
    cuda_arch_flags,
    cuda_home,
    cuda_object_commands,
    library_name,
    metadata_path,
    source_dir,
    sources,
    write_metadata,
)

__all__ = [
    "KINDS",
    "add_commands",
    "build",
    "build_dir",
    "build_flags",
    "cache_root",
    "check_metadata",
    "cuda_arch_flags",
    "cuda_home",
    "cuda_object_commands",
    "library_name",
    "load",
    "load_namespace",
    "metadata_path",
    "not_built_reason",
    "prebuilt_dir",
    "source_dir",
    "sources",
    "write_metadata",
]
