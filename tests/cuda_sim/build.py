"""Builds csrc/*.cu as C++ against the CPU emulation in sim_cuda.h (see README.md)."""

from __future__ import annotations

import re
from pathlib import Path

from torch.utils import cpp_extension

from mpfast.ops.extension import cuda_home

HERE = Path(__file__).resolve().parent
CSRC = HERE.parents[1] / "csrc"

# kernel<T><<<grid, threads, smem, stream>>>(args) -> sim::launch(&kernel<T>, grid, threads, smem, stream, args)
_LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^;{}()<>]*>)?)\s*<<<(.*?)>>>\(", re.S)

_BINDINGS = r'''
#include <torch/extension.h>
#include "mpfast.h"

namespace {
using at::Tensor;
using OptTensor = std::optional<Tensor>;
const at::TensorBase* ptr(const OptTensor& t) { return t.has_value() && t->defined() ? &*t : nullptr; }
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("temporal_diff_fwd", [](Tensor x, std::vector<int64_t> s, Tensor out) { mpfast::temporal_diff_fwd_cuda(x, s, out); });
  m.def("temporal_diff_bwd", [](Tensor g, std::vector<int64_t> s, Tensor gx) { mpfast::temporal_diff_bwd_cuda(g, s, gx); });
  m.def("motion_mix_fwd", [](Tensor h, Tensor mm, Tensor gate, Tensor u, Tensor v, Tensor mu) {
    mpfast::motion_mix_fwd_cuda(h, mm, gate, u, v, mu); });
  m.def("motion_mix_bwd", [](Tensor gu, Tensor gv, Tensor gmu, Tensor h, Tensor mm, Tensor gate, Tensor gh, Tensor gm,
                             Tensor gg) { mpfast::motion_mix_bwd_cuda(gu, gv, gmu, h, mm, gate, gh, gm, gg); });
  m.def("prompt_attention_fwd", [](Tensor q, Tensor k, Tensor v, double scale, OptTensor mask, Tensor out) {
    mpfast::prompt_attention_fwd_cuda(q, k, v, scale, ptr(mask), out); });
  m.def("prompt_attention_bwd", [](Tensor go, Tensor q, Tensor k, Tensor v, double scale, OptTensor mask, Tensor gq,
                                   Tensor gk, Tensor gv) {
    mpfast::prompt_attention_bwd_cuda(go, q, k, v, scale, ptr(mask), gq, gk, gv); });
  m.def("class_logits_fwd", [](Tensor q, Tensor k, Tensor r, Tensor v, Tensor gram, Tensor proj, Tensor n0, Tensor s,
                               double scale, OptTensor mask, Tensor out) {
    mpfast::class_logits_fwd_cuda(q, k, r, v, gram, proj, n0, s, scale, ptr(mask), out); });
  m.def("class_logits_bwd", [](Tensor g, Tensor q, Tensor k, Tensor r, Tensor v, Tensor gram, Tensor proj, Tensor n0,
                               Tensor s, double scale, OptTensor mask, Tensor gq, Tensor gk, Tensor gr, Tensor gv,
                               Tensor ggram, Tensor gproj, Tensor gn0, Tensor gs) {
    mpfast::class_logits_bwd_cuda(g, q, k, r, v, gram, proj, n0, s, scale, ptr(mask), gq, gk, gr, gv, ggram, gproj,
                                  gn0, gs); });
}
'''


def translate(source: str) -> str:
    """A .cu file as C++ for sim_cuda.h: launches rewritten, no stream, no launch check."""
    source = source.replace("cuda::stream()", "nullptr").replace("C10_CUDA_KERNEL_LAUNCH_CHECK();", ";")
    source = source.replace("extern __shared__ unsigned char scratch_bytes[];",
                            "unsigned char* scratch_bytes = sim::dynamic_smem();")
    return _LAUNCH.sub(lambda m: f"sim::launch(&{m.group(1)}, {m.group(2)}, ", source)


def cuda_include() -> Path | None:
    """The CUDA toolkit's include folder (cuda_runtime_api.h: types the kernels' headers use), or None."""
    home = cuda_home()
    return home / "include" if home is not None and (home / "include" / "cuda_runtime_api.h").is_file() else None


def build(verbose: bool = False):
    """The emulated CUDA kernels as a Python module (ninja rebuilds what changed)."""
    include = cuda_include()
    if include is None:
        raise RuntimeError("the CUDA emulation needs a CUDA toolkit's headers (set CUDA_HOME)")
    sources = sorted(CSRC.glob("*.cu"))
    build_dir = Path(cpp_extension._get_build_directory("mpfast_cuda_sim", verbose))
    files = {build_dir / (src.stem + "_cu.cpp"): f'#line 1 "{src}"\n' + translate(src.read_text()) for src in sources}
    files[build_dir / "bindings.cpp"] = _BINDINGS
    for path, text in files.items():
        if not path.exists() or path.read_text() != text:  # unchanged files keep their time: nothing rebuilds
            path.write_text(text)
    return cpp_extension.load(
        name="mpfast_cuda_sim", sources=[str(path) for path in files], build_directory=str(build_dir), verbose=verbose,
        extra_include_paths=[str(CSRC), str(include)],
        extra_cflags=["-O2", "-std=c++20", "-include", str(HERE / "sim_cuda.h"), "-Wno-unused-function"])
