// A CPU emulation of the CUDA execution model the csrc/*.cu kernels use, to run them
// without a GPU (tests/cuda_sim/README.md). Force-included (-include) before a kernel file
// that tests/cuda_sim/build.py compiled as C++ after rewriting its <<<...>>> launches into
// sim::launch(...): each block's threads are real threads; __syncthreads() and the warp
// intrinsics are barriers, so a block whose threads do not all reach a __syncthreads()
// (or a warp whose lanes do not all reach a shuffle) hangs, which the harness reports.
// Shared memory: __shared__ variables become function statics (blocks run one after
// another); the dynamic buffer is sim::dynamic_smem().
#pragma once

#include <cuda_runtime_api.h>  // first, so that its host_defines.h cannot redefine what follows

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __forceinline__
#define __global__
#define __device__
#define __host__
#define __shared__ static
#define __forceinline__ inline

using std::exp;
using std::log;
using std::max;
using std::min;
using std::sqrt;
using std::tanh;

namespace sim {

struct Index {
  unsigned x, y, z;
};

struct Block {
  explicit Block(unsigned threads, size_t smem)
      : sync(threads), lanes(threads), dynamic(smem + 16) {
    for (unsigned w = 0; w < (threads + 31) / 32; ++w) warps.push_back(std::make_unique<std::barrier<>>(32));
  }
  std::barrier<> sync;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<uint64_t> lanes;  // one exchange slot per thread
  std::vector<unsigned char> dynamic;
};

inline thread_local Block* block = nullptr;
inline thread_local unsigned thread = 0;

inline unsigned char* dynamic_smem() { return sim::block->dynamic.data(); }

// Blocks a launch runs at most (every kernel here loops over its work with a grid stride).
inline unsigned max_blocks() {
  const char* value = std::getenv("MPFAST_CUDA_SIM_BLOCKS");
  return value ? static_cast<unsigned>(std::max(1, std::atoi(value))) : 3u;
}

}  // namespace sim

inline thread_local sim::Index threadIdx{0, 0, 0}, blockIdx{0, 0, 0}, blockDim{1, 1, 1}, gridDim{1, 1, 1};

inline void __syncthreads() { sim::block->sync.arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { sim::block->warps[sim::thread / 32]->arrive_and_wait(); }

template <typename T>
T __shfl_sync(unsigned mask, T value, int src, int = 32) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffles move at most 8 bytes");
  if (mask != 0xffffffffu) std::abort();  // the kernels shuffle with whole warps only
  sim::Block& b = *sim::block;
  const unsigned warp = sim::thread / 32;
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  b.lanes[sim::thread] = bits;
  b.warps[warp]->arrive_and_wait();
  bits = b.lanes[warp * 32 + (static_cast<unsigned>(src) % 32)];
  b.warps[warp]->arrive_and_wait();  // nobody overwrites a slot before every lane read it
  std::memcpy(&value, &bits, sizeof(T));
  return value;
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
  return __shfl_sync(mask, value, static_cast<int>(sim::thread % 32) ^ lane_mask, width);
}

namespace sim {

// kernel<<<grid, threads, smem, stream>>>(args...), grid and threads one-dimensional.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), unsigned grid, unsigned threads, size_t smem, const void*, Args&&... args) {
  if (threads % 32 != 0 || threads > 1024) std::abort();
  const unsigned blocks = std::min(grid, max_blocks());
  for (unsigned bx = 0; bx < blocks; ++bx) {
    Block state(threads, smem);
    std::vector<std::thread> pool;
    for (unsigned t = 0; t < threads; ++t) {
      pool.emplace_back([&, t] {
        sim::block = &state;
        sim::thread = t;
        threadIdx = {t, 0, 0};
        blockIdx = {bx, 0, 0};
        blockDim = {threads, 1, 1};
        gridDim = {blocks, 1, 1};
        kernel(args...);
      });
    }
    for (auto& th : pool) th.join();
  }
}

}  // namespace sim
