// mpfast compiled ops: entry points shared by the C++ (CPU) and CUDA builds.
//
// Every op fills outputs that the Python side allocated (mpfast/ops/_spec.py, from the op's
// spec: contiguous, the right shape and dtype); bindings.cpp checks every argument with
// TORCH_CHECK before a kernel runs, so the kernels below may assume valid input:
//   * float16, bfloat16, float32 or float64, all tensors of one op in one dtype;
//   * inputs with any strides (stride 0 included), outputs contiguous;
//   * shapes as in mpfast/ops/<op>.py (the reference implementations are the spec).
// Only light ATen headers are included here: compile time matters (the CPU build runs
// on first use).
#pragma once

#include <ATen/core/TensorBase.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace mpfast {

// One dimension of a strided view: number of elements and stride (in elements).
struct Dim {
  int64_t size;
  int64_t stride;
};

// Merges the dimensions [first, dim()) of t into as few strided dimensions as
// possible (dropping size-1 dimensions), outermost first; never empty (a single
// {1, 1} for no elements to merge). Two neighbours merge when the outer one's
// stride equals size * stride of the inner one, as in a contiguous layout.
inline std::vector<Dim> collapse_dims(const at::TensorBase& t, int64_t first) {
  std::vector<Dim> dims;
  for (int64_t i = first; i < t.dim(); ++i) {
    const int64_t size = t.size(i);
    const int64_t stride = t.stride(i);
    if (size == 1) continue;
    if (!dims.empty() && dims.back().stride == size * stride) {
      dims.back() = {dims.back().size * size, stride};
    } else {
      dims.push_back({size, stride});
    }
  }
  if (dims.empty()) dims.push_back({1, 1});
  return dims;
}

// The CUDA kernels take at most this many merged feature dimensions (see collapse_dims);
// the bindings make rarer layouts contiguous first.
constexpr int kMaxCudaFeatureDims = 6;

#define MPFAST_DECLARE_OPS(suffix)                                                                      \
  void temporal_diff_fwd_##suffix(const at::TensorBase& x, c10::IntArrayRef strides,                   \
                                  const at::TensorBase& out);                                          \
  void temporal_diff_bwd_##suffix(const at::TensorBase& grad, c10::IntArrayRef strides,                \
                                  const at::TensorBase& grad_x);                                       \
  void motion_mix_fwd_##suffix(const at::TensorBase& h, const at::TensorBase& m,                       \
                               const at::TensorBase& gate, const at::TensorBase& u,                    \
                               const at::TensorBase& v, const at::TensorBase& mu);                     \
  void motion_mix_bwd_##suffix(const at::TensorBase& grad_u, const at::TensorBase& grad_v,             \
                               const at::TensorBase& grad_mu, const at::TensorBase& h,                 \
                               const at::TensorBase& m, const at::TensorBase& gate,                    \
                               const at::TensorBase& grad_h, const at::TensorBase& grad_m,             \
                               const at::TensorBase& grad_gate);                                       \
  void prompt_attention_fwd_##suffix(const at::TensorBase& q, const at::TensorBase& k,                 \
                                     const at::TensorBase& v, double scale,                            \
                                     const at::TensorBase* key_padding_mask,                           \
                                     const at::TensorBase& out);                                       \
  void prompt_attention_bwd_##suffix(const at::TensorBase& grad_out, const at::TensorBase& q,          \
                                     const at::TensorBase& k, const at::TensorBase& v, double scale,   \
                                     const at::TensorBase* key_padding_mask,                           \
                                     const at::TensorBase& grad_q, const at::TensorBase& grad_k,       \
                                     const at::TensorBase& grad_v);                                    \
  void class_logits_fwd_##suffix(const at::TensorBase& q, const at::TensorBase& k,                     \
                                 const at::TensorBase& base_v, const at::TensorBase& v,                \
                                 const at::TensorBase& gram, const at::TensorBase& proj,               \
                                 const at::TensorBase& base_dot, const at::TensorBase& base_sq,        \
                                 double scale, const at::TensorBase* key_padding_mask,                 \
                                 const at::TensorBase& cosine);                                        \
  void class_logits_bwd_##suffix(const at::TensorBase& grad_cosine, const at::TensorBase& q,           \
                                 const at::TensorBase& k, const at::TensorBase& base_v,                \
                                 const at::TensorBase& v, const at::TensorBase& gram,                  \
                                 const at::TensorBase& proj, const at::TensorBase& base_dot,           \
                                 const at::TensorBase& base_sq, double scale,                          \
                                 const at::TensorBase* key_padding_mask, const at::TensorBase& grad_q, \
                                 const at::TensorBase& grad_k, const at::TensorBase& grad_base_v,      \
                                 const at::TensorBase& grad_v, const at::TensorBase& grad_gram,        \
                                 const at::TensorBase& grad_proj, const at::TensorBase& grad_base_dot, \
                                 const at::TensorBase& grad_base_sq);

MPFAST_DECLARE_OPS(cpu)
MPFAST_DECLARE_OPS(cuda)

#undef MPFAST_DECLARE_OPS

}  // namespace mpfast
