// Registers the mpfast kernels as torch operators and checks every argument first.
//
// Compiled twice: for the C++ backend (namespace mpfast_cpp, CPU kernels) and, with
// MPFAST_WITH_CUDA defined (bindings_cuda.cpp), for the CUDA backend (namespace mpfast_cuda). Each op takes
// its outputs as arguments after its inputs and fills them (the contract of every backend; the
// registration in mpfast/ops/_spec.py allocates them from the op's spec) and returns nothing:
//   torch.ops.mpfast_cpp.temporal_diff_fwd(x, strides, out)
// Bad arguments raise TypeError / ValueError naming the argument and the broken
// constraint, before any memory is touched: these operators can be called directly, so
// they check the shapes of the outputs they are given too.
#include <torch/library.h>

#include <cstdint>
#include <initializer_list>
#include <sstream>
#include <string>
#include <utility>

#include "mpfast.h"

#ifdef MPFAST_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#define MPFAST_NS mpfast_cuda
#define MPFAST_IMPL(name) mpfast::name##_cuda
#define MPFAST_DEVICE_GUARD(t) const c10::cuda::CUDAGuard device_guard((t).device())
static constexpr c10::DeviceType kDevice = c10::DeviceType::CUDA;
#else
#define MPFAST_NS mpfast_cpp
#define MPFAST_IMPL(name) mpfast::name##_cpu
#define MPFAST_DEVICE_GUARD(t) (void)0
static constexpr c10::DeviceType kDevice = c10::DeviceType::CPU;
#endif

#define MPFAST_STR2(x) #x
#define MPFAST_STR(x) MPFAST_STR2(x)

namespace {

using at::Tensor;

std::string shape_str(c10::IntArrayRef shape) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < shape.size(); ++i) os << (i ? ", " : "") << shape[i];
  os << "]";
  return os.str();
}

// Checks an input: defined, on this backend's device, floating (or `dtype` if given), rank `ndim` (-1: any).
void check_input(const char* op, const char* name, const Tensor& t, int64_t ndim, const char* layout) {
  TORCH_CHECK_TYPE(t.defined(), op, ": ", name, " must be a tensor, got an undefined tensor");
  TORCH_CHECK_VALUE(t.device().type() == kDevice, op, ": ", name, " must be a ", c10::DeviceTypeName(kDevice),
                    " tensor, got a tensor on ", t.device());
  TORCH_CHECK_TYPE(t.layout() == c10::kStrided, op, ": ", name, " must be a strided (dense) tensor, got layout ",
                   t.layout());
  const auto dtype = t.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16, op,
                   ": ", name, " must have dtype float16, bfloat16, float32 or float64, got ", dtype);
  if (ndim >= 0) {
    TORCH_CHECK_VALUE(t.dim() == ndim, op, ": ", name, " must have ", ndim, " dimensions ", layout, ", got shape ",
                      shape_str(t.sizes()));
  }
}

void check_same_dtype(const char* op, const char* name, const Tensor& t, const char* ref_name, const Tensor& ref) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), op, ": ", name, " must have the dtype of ", ref_name, " (",
                   ref.scalar_type(), "), got ", t.scalar_type());
}

void check_same_device(const char* op, const char* name, const Tensor& t, const char* ref_name, const Tensor& ref) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, " must be on the device of ", ref_name, " (",
                    ref.device(), "), got ", t.device());
}

// Checks an output: a contiguous tensor of `shape` with the dtype and device of `like`.
void check_output(const char* op, const char* name, const Tensor& out, c10::IntArrayRef shape, const Tensor& like) {
  TORCH_CHECK_TYPE(out.defined(), op, ": output ", name, " must be a tensor, got an undefined tensor");
  check_same_device(op, name, out, "the inputs", like);
  check_same_dtype(op, name, out, "the inputs", like);
  TORCH_CHECK_VALUE(out.sizes() == shape, op, ": output ", name, " must have shape ", shape_str(shape), ", got ",
                    shape_str(out.sizes()));
  TORCH_CHECK_VALUE(out.layout() == c10::kStrided && out.is_contiguous(), op, ": output ", name,
                    " must be contiguous");
}

using Named = std::pair<const char*, const Tensor*>;

// First and one-past-last address a (non-empty) strided tensor can touch.
std::pair<uintptr_t, uintptr_t> byte_range(const Tensor& t) {
  int64_t last = 0;
  for (int64_t i = 0; i < t.dim(); ++i) last += (t.size(i) - 1) * t.stride(i);
  const auto first = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  return {first, first + static_cast<uintptr_t>((last + 1) * t.element_size())};
}

bool may_overlap(const Tensor& a, const Tensor& b) {
  if (!a.defined() || !b.defined() || a.numel() == 0 || b.numel() == 0) return false;
  if (!a.storage().is_alias_of(b.storage())) return false;
  const auto [a0, a1] = byte_range(a);
  const auto [b0, b1] = byte_range(b);
  return a0 < b1 && b0 < a1;
}

// The kernels read every input while writing the outputs: no output may share memory
// with an input or another output (checked on address ranges, so conservatively).
void check_disjoint(const char* op, std::initializer_list<Named> outputs, std::initializer_list<Named> inputs) {
  for (auto out = outputs.begin(); out != outputs.end(); ++out) {
    for (const auto& [name, t] : inputs) {
      TORCH_CHECK_VALUE(!may_overlap(*out->second, *t), op, ": output ", out->first,
                        " must not share memory with input ", name);
    }
    for (auto other = outputs.begin(); other != out; ++other) {
      TORCH_CHECK_VALUE(!may_overlap(*out->second, *other->second), op, ": output ", out->first,
                        " must not share memory with output ", other->first);
    }
  }
}

void check_strides(const char* op, c10::IntArrayRef strides) {
  TORCH_CHECK_VALUE(!strides.empty(), op, ": strides must be a non-empty list of ints");
  for (size_t i = 0; i < strides.size(); ++i) {
    TORCH_CHECK_VALUE(strides[i] >= 1, op, ": strides must be >= 1, got ", strides[i], " at position ", i);
  }
}

// The CUDA kernels index at most kMaxCudaFeatureDims merged feature dimensions; a rarer
// layout is copied to a contiguous one first. The CPU kernels take any layout.
Tensor feature_layout(const Tensor& t, [[maybe_unused]] int64_t first_feature_dim) {
#ifdef MPFAST_WITH_CUDA
  if (static_cast<int>(mpfast::collapse_dims(t, first_feature_dim).size()) > mpfast::kMaxCudaFeatureDims) {
    return t.contiguous();
  }
#endif
  return t;
}

void temporal_diff_fwd(const Tensor& x, c10::IntArrayRef strides, const Tensor& out) {
  const char* op = MPFAST_STR(MPFAST_NS) ".temporal_diff_fwd";
  check_input(op, "x", x, -1, "");
  TORCH_CHECK_VALUE(x.dim() >= 2, op, ": x must have at least 2 dimensions [B,T,*F], got shape ",
                    shape_str(x.sizes()));
  check_strides(op, strides);
  std::vector<int64_t> shape{x.size(0), static_cast<int64_t>(strides.size())};
  shape.insert(shape.end(), x.sizes().begin() + 1, x.sizes().end());
  check_output(op, "out", out, shape, x);
  check_disjoint(op, {{"out", &out}}, {{"x", &x}});
  MPFAST_DEVICE_GUARD(x);
  MPFAST_IMPL(temporal_diff_fwd)(feature_layout(x, 2), strides, out);
}

void temporal_diff_bwd(const Tensor& grad, c10::IntArrayRef strides, const Tensor& grad_x) {
  const char* op = MPFAST_STR(MPFAST_NS) ".temporal_diff_bwd";
  check_input(op, "grad", grad, -1, "");
  TORCH_CHECK_VALUE(grad.dim() >= 3, op, ": grad must have at least 3 dimensions [B,S,T,*F], got shape ",
                    shape_str(grad.sizes()));
  check_strides(op, strides);
  TORCH_CHECK_VALUE(grad.size(1) == static_cast<int64_t>(strides.size()), op, ": grad must have S = ",
                    strides.size(), " (one per stride) in dimension 1, got shape ", shape_str(grad.sizes()));
  std::vector<int64_t> shape{grad.size(0)};
  shape.insert(shape.end(), grad.sizes().begin() + 2, grad.sizes().end());
  check_output(op, "grad_x", grad_x, shape, grad);
  check_disjoint(op, {{"grad_x", &grad_x}}, {{"grad", &grad}});
  MPFAST_DEVICE_GUARD(grad);
  MPFAST_IMPL(temporal_diff_bwd)(feature_layout(grad, 3), strides, grad_x);
}

void check_motion_inputs(const char* op, const Tensor& h, const Tensor& m, const Tensor& gate) {
  check_input(op, "h", h, 3, "[B,T,D]");
  check_input(op, "m", m, 4, "[B,S,T,D]");
  check_input(op, "gate", gate, 2, "[S,D]");
  check_same_device(op, "m", m, "h", h);
  check_same_device(op, "gate", gate, "h", h);
  check_same_dtype(op, "m", m, "h", h);
  check_same_dtype(op, "gate", gate, "h", h);
  const int64_t B = h.size(0), T = h.size(1), D = h.size(2), S = m.size(1);
  TORCH_CHECK_VALUE(m.size(0) == B && m.size(2) == T && m.size(3) == D, op, ": m must have shape [B,S,T,D] = [", B,
                    ", S, ", T, ", ", D, "] to match h, got ", shape_str(m.sizes()));
  TORCH_CHECK_VALUE(gate.size(0) == S && gate.size(1) == D, op, ": gate must have shape [S,D] = [", S, ", ", D,
                    "], got ", shape_str(gate.sizes()));
  TORCH_CHECK_VALUE(T >= 1 && S >= 1, op, ": motion_mix needs T >= 1 frames and S >= 1 streams, got T=", T, ", S=",
                    S);
}

void motion_mix_fwd(const Tensor& h, const Tensor& m, const Tensor& gate, const Tensor& u, const Tensor& v,
                    const Tensor& mu) {
  const char* op = MPFAST_STR(MPFAST_NS) ".motion_mix_fwd";
  check_motion_inputs(op, h, m, gate);
  check_output(op, "u", u, h.sizes(), h);
  check_output(op, "v", v, {h.size(0), h.size(2)}, h);
  check_output(op, "mu", mu, {h.size(0), h.size(2)}, h);
  check_disjoint(op, {{"u", &u}, {"v", &v}, {"mu", &mu}}, {{"h", &h}, {"m", &m}, {"gate", &gate}});
  MPFAST_DEVICE_GUARD(h);
  MPFAST_IMPL(motion_mix_fwd)(h, m, gate, u, v, mu);
}

void motion_mix_bwd(const Tensor& grad_u, const Tensor& grad_v, const Tensor& grad_mu, const Tensor& h,
                    const Tensor& m, const Tensor& gate, const Tensor& grad_h, const Tensor& grad_m,
                    const Tensor& grad_gate) {
  const char* op = MPFAST_STR(MPFAST_NS) ".motion_mix_bwd";
  check_motion_inputs(op, h, m, gate);
  const std::vector<int64_t> pooled{h.size(0), h.size(2)};
  const std::pair<const char*, const Tensor*> grads[] = {{"grad_u", &grad_u}, {"grad_v", &grad_v}, {"grad_mu", &grad_mu}};
  for (const auto& [name, g] : grads) {
    check_input(op, name, *g, -1, "");
    check_same_device(op, name, *g, "h", h);
    check_same_dtype(op, name, *g, "h", h);
  }
  TORCH_CHECK_VALUE(grad_u.sizes() == h.sizes(), op, ": grad_u must have the shape of h ", shape_str(h.sizes()),
                    ", got ", shape_str(grad_u.sizes()));
  TORCH_CHECK_VALUE(grad_v.sizes() == c10::IntArrayRef(pooled), op, ": grad_v must have shape [B,D] = ",
                    shape_str(pooled), ", got ", shape_str(grad_v.sizes()));
  TORCH_CHECK_VALUE(grad_mu.sizes() == c10::IntArrayRef(pooled), op, ": grad_mu must have shape [B,D] = ",
                    shape_str(pooled), ", got ", shape_str(grad_mu.sizes()));
  check_output(op, "grad_h", grad_h, h.sizes(), h);
  check_output(op, "grad_m", grad_m, m.sizes(), h);
  check_output(op, "grad_gate", grad_gate, gate.sizes(), h);
  check_disjoint(op, {{"grad_h", &grad_h}, {"grad_m", &grad_m}, {"grad_gate", &grad_gate}},
                 {{"grad_u", &grad_u}, {"grad_v", &grad_v}, {"grad_mu", &grad_mu}, {"h", &h}, {"m", &m}, {"gate", &gate}});
  MPFAST_DEVICE_GUARD(h);
  MPFAST_IMPL(motion_mix_bwd)(grad_u, grad_v, grad_mu, h, m, gate, grad_h, grad_m, grad_gate);
}

// A finite score scale and an optional key_padding_mask: bool [B, L] on q's device (True = padded key).
void check_scale_and_mask(const char* op, double scale, const std::optional<Tensor>& mask, const Tensor& q, int64_t B,
                          int64_t L) {
  TORCH_CHECK_VALUE(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  if (!mask.has_value() || !mask->defined()) return;
  TORCH_CHECK_TYPE(mask->scalar_type() == at::kBool, op,
                   ": key_padding_mask must be a bool tensor (True = padded key), got ", mask->scalar_type());
  check_same_device(op, "key_padding_mask", *mask, "q", q);
  TORCH_CHECK_TYPE(mask->layout() == c10::kStrided, op, ": key_padding_mask must be a strided (dense) tensor");
  TORCH_CHECK_VALUE(mask->dim() == 2 && mask->size(0) == B && mask->size(1) == L, op,
                    ": key_padding_mask must have shape [B,L] = [", B, ", ", L, "], got ", shape_str(mask->sizes()));
}

void check_attention_inputs(const char* op, const Tensor& q, const Tensor& k, const Tensor& v, double scale,
                            const std::optional<Tensor>& mask) {
  check_input(op, "q", q, -1, "");
  TORCH_CHECK_VALUE(q.dim() == 3 || q.dim() == 4, op, ": q must have 3 or 4 dimensions [C,H,d] or [B,C,H,d], got shape ",
                    shape_str(q.sizes()));
  check_input(op, "k", k, 4, "[B,L,H,d]");
  check_input(op, "v", v, 4, "[B,L,H,d]");
  check_same_device(op, "k", k, "q", q);
  check_same_device(op, "v", v, "q", q);
  check_same_dtype(op, "k", k, "q", q);
  check_same_dtype(op, "v", v, "q", q);
  TORCH_CHECK_VALUE(k.sizes() == v.sizes(), op, ": k and v must have the same shape [B,L,H,d], got ",
                    shape_str(k.sizes()), " and ", shape_str(v.sizes()));
  const int64_t B = k.size(0), L = k.size(1), H = k.size(2), d = k.size(3);
  TORCH_CHECK_VALUE(q.size(-2) == H && q.size(-1) == d, op, ": q must end in [H,d] = [", H, ", ", d,
                    "] to match k, got shape ", shape_str(q.sizes()));
  TORCH_CHECK_VALUE(q.dim() == 3 || q.size(0) == B, op, ": q of shape [B,C,H,d] must have B = ", B,
                    " as k, got shape ", shape_str(q.sizes()));
  TORCH_CHECK_VALUE(L >= 1 && d >= 1, op, ": k must have L >= 1 keys and d >= 1, got shape ", shape_str(k.sizes()));
  check_scale_and_mask(op, scale, mask, q, B, L);
}

const at::TensorBase* mask_ptr(const std::optional<Tensor>& mask) {
  return mask.has_value() && mask->defined() ? &*mask : nullptr;
}

void prompt_attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v, double scale,
                          const std::optional<Tensor>& key_padding_mask, const Tensor& out) {
  const char* op = MPFAST_STR(MPFAST_NS) ".prompt_attention_fwd";
  check_attention_inputs(op, q, k, v, scale, key_padding_mask);
  check_output(op, "out", out, {k.size(0), q.size(-3), k.size(2), k.size(3)}, q);
  const Tensor mask = key_padding_mask.value_or(Tensor());
  check_disjoint(op, {{"out", &out}}, {{"q", &q}, {"k", &k}, {"v", &v}, {"key_padding_mask", &mask}});
  MPFAST_DEVICE_GUARD(q);
  MPFAST_IMPL(prompt_attention_fwd)(q, k, v, scale, mask_ptr(key_padding_mask), out);
}

void prompt_attention_bwd(const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v, double scale,
                          const std::optional<Tensor>& key_padding_mask, const Tensor& grad_q, const Tensor& grad_k,
                          const Tensor& grad_v) {
  const char* op = MPFAST_STR(MPFAST_NS) ".prompt_attention_bwd";
  check_attention_inputs(op, q, k, v, scale, key_padding_mask);
  check_input(op, "grad_out", grad_out, 4, "[B,C,H,d]");
  check_same_device(op, "grad_out", grad_out, "q", q);
  check_same_dtype(op, "grad_out", grad_out, "q", q);
  const std::vector<int64_t> out_shape{k.size(0), q.size(-3), k.size(2), k.size(3)};
  TORCH_CHECK_VALUE(grad_out.sizes() == c10::IntArrayRef(out_shape), op, ": grad_out must have shape [B,C,H,d] = ",
                    shape_str(out_shape), ", got ", shape_str(grad_out.sizes()));
  check_output(op, "grad_q", grad_q, q.sizes(), q);
  check_output(op, "grad_k", grad_k, k.sizes(), q);
  check_output(op, "grad_v", grad_v, v.sizes(), q);
  const Tensor mask = key_padding_mask.value_or(Tensor());
  check_disjoint(op, {{"grad_q", &grad_q}, {"grad_k", &grad_k}, {"grad_v", &grad_v}},
                 {{"grad_out", &grad_out}, {"q", &q}, {"k", &k}, {"v", &v}, {"key_padding_mask", &mask}});
  MPFAST_DEVICE_GUARD(q);
  MPFAST_IMPL(prompt_attention_bwd)(grad_out, q, k, v, scale, mask_ptr(key_padding_mask), grad_q, grad_k, grad_v);
}

void check_class_inputs(const char* op, const Tensor& q, const Tensor& k, const Tensor& base_v, const Tensor& v,
                        const Tensor& gram, const Tensor& proj, const Tensor& base_dot, const Tensor& base_sq,
                        double scale, const std::optional<Tensor>& mask) {
  check_input(op, "q", q, 3, "[C,H,d]");
  check_input(op, "k", k, 4, "[B,L,H,d]");
  const int64_t C = q.size(0), B = k.size(0), L = k.size(1), H = k.size(2), d = k.size(3);
  TORCH_CHECK_VALUE(L >= 1 && d >= 1, op, ": k must have L >= 1 keys and d >= 1, got shape ", shape_str(k.sizes()));
  TORCH_CHECK_VALUE(q.size(1) == H && q.size(2) == d, op, ": q must have shape [C,H,d] = [", C, ", ", H, ", ", d,
                    "] to match k, got ", shape_str(q.sizes()));
  const std::pair<const char*, const Tensor*> others[] = {{"base_v", &base_v}, {"v", &v}, {"gram", &gram},
                                                          {"proj", &proj}, {"base_dot", &base_dot},
                                                          {"base_sq", &base_sq}};
  const std::vector<int64_t> shapes[] = {{C, H, d}, {B, L, H, d}, {B, H * L, H * L}, {B, H, L}, {B, C}, {C}};
  const char* layouts[] = {"[C,H,d]", "[B,L,H,d]", "[B,H*L,H*L]", "[B,H,L]", "[B,C]", "[C]"};
  for (size_t i = 0; i < 6; ++i) {
    const auto& [name, t] = others[i];
    check_input(op, name, *t, static_cast<int64_t>(shapes[i].size()), layouts[i]);
    check_same_device(op, name, *t, "q", q);
    check_same_dtype(op, name, *t, "q", q);
    TORCH_CHECK_VALUE(t->sizes() == c10::IntArrayRef(shapes[i]), op, ": ", name, " must have shape ", layouts[i], " = ",
                      shape_str(shapes[i]), ", got ", shape_str(t->sizes()));
  }
  check_same_device(op, "k", k, "q", q);
  check_same_dtype(op, "k", k, "q", q);
  check_scale_and_mask(op, scale, mask, q, B, L);
}

void class_logits_fwd(const Tensor& q, const Tensor& k, const Tensor& base_v, const Tensor& v, const Tensor& gram,
                      const Tensor& proj, const Tensor& base_dot, const Tensor& base_sq, double scale,
                      const std::optional<Tensor>& key_padding_mask, const Tensor& cosine) {
  const char* op = MPFAST_STR(MPFAST_NS) ".class_logits_fwd";
  check_class_inputs(op, q, k, base_v, v, gram, proj, base_dot, base_sq, scale, key_padding_mask);
  check_output(op, "cosine", cosine, {k.size(0), q.size(0)}, q);
  const Tensor mask = key_padding_mask.value_or(Tensor());
  check_disjoint(op, {{"cosine", &cosine}},
                 {{"q", &q}, {"k", &k}, {"base_v", &base_v}, {"v", &v}, {"gram", &gram}, {"proj", &proj},
                  {"base_dot", &base_dot}, {"base_sq", &base_sq}, {"key_padding_mask", &mask}});
  MPFAST_DEVICE_GUARD(q);
  MPFAST_IMPL(class_logits_fwd)(q, k, base_v, v, gram, proj, base_dot, base_sq, scale, mask_ptr(key_padding_mask),
                                cosine);
}

void class_logits_bwd(const Tensor& grad_cosine, const Tensor& q, const Tensor& k, const Tensor& base_v,
                      const Tensor& v, const Tensor& gram, const Tensor& proj, const Tensor& base_dot,
                      const Tensor& base_sq, double scale, const std::optional<Tensor>& key_padding_mask,
                      const Tensor& grad_q, const Tensor& grad_k, const Tensor& grad_base_v, const Tensor& grad_v,
                      const Tensor& grad_gram, const Tensor& grad_proj, const Tensor& grad_base_dot,
                      const Tensor& grad_base_sq) {
  const char* op = MPFAST_STR(MPFAST_NS) ".class_logits_bwd";
  check_class_inputs(op, q, k, base_v, v, gram, proj, base_dot, base_sq, scale, key_padding_mask);
  check_input(op, "grad_cosine", grad_cosine, 2, "[B,C]");
  check_same_device(op, "grad_cosine", grad_cosine, "q", q);
  check_same_dtype(op, "grad_cosine", grad_cosine, "q", q);
  TORCH_CHECK_VALUE(grad_cosine.sizes() == base_dot.sizes(), op, ": grad_cosine must have shape [B,C] = ",
                    shape_str(base_dot.sizes()), ", got ", shape_str(grad_cosine.sizes()));
  const std::pair<const char*, const Tensor*> grads[] = {
      {"grad_q", &grad_q}, {"grad_k", &grad_k}, {"grad_base_v", &grad_base_v}, {"grad_v", &grad_v},
      {"grad_gram", &grad_gram}, {"grad_proj", &grad_proj}, {"grad_base_dot", &grad_base_dot},
      {"grad_base_sq", &grad_base_sq}};
  const Tensor* inputs[] = {&q, &k, &base_v, &v, &gram, &proj, &base_dot, &base_sq};
  for (size_t i = 0; i < 8; ++i) check_output(op, grads[i].first, *grads[i].second, inputs[i]->sizes(), q);
  const Tensor mask = key_padding_mask.value_or(Tensor());
  check_disjoint(op,
                 {grads[0], grads[1], grads[2], grads[3], grads[4], grads[5], grads[6], grads[7]},
                 {{"grad_cosine", &grad_cosine}, {"q", &q}, {"k", &k}, {"base_v", &base_v}, {"v", &v},
                  {"gram", &gram}, {"proj", &proj}, {"base_dot", &base_dot}, {"base_sq", &base_sq},
                  {"key_padding_mask", &mask}});
  MPFAST_DEVICE_GUARD(q);
  MPFAST_IMPL(class_logits_bwd)(grad_cosine, q, k, base_v, v, gram, proj, base_dot, base_sq, scale,
                                mask_ptr(key_padding_mask), grad_q, grad_k, grad_base_v, grad_v, grad_gram,
                                grad_proj, grad_base_dot, grad_base_sq);
}

}  // namespace

TORCH_LIBRARY(MPFAST_NS, m) {
  m.def("temporal_diff_fwd(Tensor x, int[] strides, Tensor(a!) out) -> ()");
  m.def("temporal_diff_bwd(Tensor grad, int[] strides, Tensor(a!) grad_x) -> ()");
  m.def("motion_mix_fwd(Tensor h, Tensor m, Tensor gate, Tensor(a!) u, Tensor(b!) v, Tensor(c!) mu) -> ()");
  m.def(
      "motion_mix_bwd(Tensor grad_u, Tensor grad_v, Tensor grad_mu, Tensor h, Tensor m, Tensor gate, "
      "Tensor(a!) grad_h, Tensor(b!) grad_m, Tensor(c!) grad_gate) -> ()");
  m.def("prompt_attention_fwd(Tensor q, Tensor k, Tensor v, float scale, Tensor? key_padding_mask, Tensor(a!) out) -> ()");
  m.def(
      "prompt_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, float scale, Tensor? key_padding_mask, "
      "Tensor(a!) grad_q, Tensor(b!) grad_k, Tensor(c!) grad_v) -> ()");
  m.def(
      "class_logits_fwd(Tensor q, Tensor k, Tensor base_v, Tensor v, Tensor gram, Tensor proj, Tensor base_dot, "
      "Tensor base_sq, float scale, Tensor? key_padding_mask, Tensor(a!) cosine) -> ()");
  m.def(
      "class_logits_bwd(Tensor grad_cosine, Tensor q, Tensor k, Tensor base_v, Tensor v, Tensor gram, Tensor proj, "
      "Tensor base_dot, Tensor base_sq, float scale, Tensor? key_padding_mask, Tensor(a!) grad_q, "
      "Tensor(b!) grad_k, Tensor(c!) grad_base_v, Tensor(d!) grad_v, Tensor(e!) grad_gram, Tensor(f!) grad_proj, "
      "Tensor(g!) grad_base_dot, Tensor(h!) grad_base_sq) -> ()");
}

// CompositeExplicitAutograd: tensors on any device reach the checks above (which name
// the device expected) instead of a dispatcher error.
TORCH_LIBRARY_IMPL(MPFAST_NS, CompositeExplicitAutograd, m) {
  m.impl("temporal_diff_fwd", &temporal_diff_fwd);
  m.impl("temporal_diff_bwd", &temporal_diff_bwd);
  m.impl("motion_mix_fwd", &motion_mix_fwd);
  m.impl("motion_mix_bwd", &motion_mix_bwd);
  m.impl("prompt_attention_fwd", &prompt_attention_fwd);
  m.impl("prompt_attention_bwd", &prompt_attention_bwd);
  m.impl("class_logits_fwd", &class_logits_fwd);
  m.impl("class_logits_bwd", &class_logits_bwd);
}
