// The bindings of the CUDA backend (torch.ops.mpfast_cuda): bindings.cpp for the CUDA kernels.
#define MPFAST_WITH_CUDA
#include "bindings.cpp"
