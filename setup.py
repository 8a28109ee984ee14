"""Package build. Metadata lives in pyproject.toml; compiled extensions are opt-in.

By default nothing is compiled: the C++ (and CUDA) kernels in csrc/ are built on first
use and cached (see mpfast/ops/extension/). To build them ahead of time, into
mpfast/_ext/, against the torch already installed:

    MPFAST_BUILD_EXT=1 pip install --no-build-isolation -e .

Switches (environment variables):
    MPFAST_BUILD_EXT=1        build the extensions (otherwise a pure-Python install)
    MPFAST_BUILD_CUDA=auto|1|0
                              the CUDA extension: auto (default) builds it when nvcc is
                              found (CUDA_HOME or PATH), 1 requires it, 0 skips it
    TORCH_CUDA_ARCH_LIST      CUDA architectures, default "8.0;9.0" (e.g. "9.0+PTX")
    MAX_JOBS                  parallel compile jobs (ninja)
Nothing probes the GPU or downloads anything. Each library gets its build metadata
(torch/CUDA/Python versions, flags) beside it; mpfast refuses a library built for
another torch.
"""

import importlib.util
import os
import sys

from setuptools import setup


def _toolchain(here):
    """mpfast/ops/extension/toolchain.py (sources, flags, build metadata), loaded by path.

    ``import mpfast`` needs the runtime dependencies (open_clip, ...), which pip may not
    have installed yet when it builds; toolchain.py needs only torch.
    """
    path = os.path.join(here, "mpfast", "ops", "extension", "toolchain.py")
    spec = importlib.util.spec_from_file_location("mpfast_setup_toolchain", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _extensions():
    flag = os.environ.get("MPFAST_BUILD_EXT", "0").strip().lower()
    if flag in ("", "0", "false", "no"):
        return {}
    try:
        import torch  # noqa: F401
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        sys.exit("MPFAST_BUILD_EXT=1 needs torch installed first and pip's --no-build-isolation")

    here = os.path.dirname(os.path.abspath(__file__))
    toolchain = _toolchain(here)  # the same sources, flags and metadata as on-demand builds

    want_cuda = os.environ.get("MPFAST_BUILD_CUDA", "auto").strip().lower()
    cuda_home = toolchain.cuda_home()
    if want_cuda in ("1", "true", "yes") and cuda_home is None:
        sys.exit("MPFAST_BUILD_CUDA=1 but nvcc was not found: set CUDA_HOME")
    build_cuda = want_cuda not in ("0", "false", "no") and cuda_home is not None
    if build_cuda:
        os.environ["CUDA_HOME"] = str(cuda_home)

    def relative(paths):
        return [os.path.relpath(p, here) for p in paths]

    cpp_flags = toolchain.build_flags("cpp")
    modules = [
        CppExtension(
            "mpfast._ext.mpfast_cpp",
            relative(toolchain.sources("cpp")),
            include_dirs=[str(toolchain.source_dir())],
            extra_compile_args={"cxx": cpp_flags["cxx"]},
            extra_link_args=cpp_flags["ld"],
        )
    ]
    if build_cuda:
        cuda_flags = toolchain.build_flags("cuda")
        modules.append(
            CUDAExtension(
                "mpfast._ext.mpfast_cuda",
                relative(toolchain.sources("cuda")),
                include_dirs=[str(toolchain.source_dir())],
                extra_compile_args={"cxx": cuda_flags["cxx"], "nvcc": cuda_flags["nvcc"]},
                extra_link_args=cuda_flags["ld"],
            )
        )

    class BuildWithMetadata(BuildExtension):
        """Builds the libraries, then writes each one's metadata file beside it."""

        def run(self):
            for ext in self.extensions:
                os.makedirs(os.path.dirname(self.get_ext_fullpath(ext.name)), exist_ok=True)
            super().run()
            for ext in self.extensions:
                kind = ext.name.rsplit("_", 1)[-1]
                library = self.get_ext_fullpath(ext.name)
                if os.path.isfile(library):
                    toolchain.write_metadata(library, kind)

    return {"ext_modules": modules, "cmdclass": {"build_ext": BuildWithMetadata.with_options(use_ninja=True)}}


setup(**_extensions())
