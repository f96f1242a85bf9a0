// A CPU stand-in for the parts of CUDA that src/cuda/*.cu use, so that g++ compiles those
// kernels unchanged and tests/cuda_kernels_emulated.rs can run them against the CPU ops on a
// machine without a GPU. Every CUDA thread of a block is an OS thread; blocks run one after
// another, so `__shared__` can be a function-local static. `__syncthreads` is a barrier over
// the block and `__shfl_xor_sync` an exchange through a barrier over the warp; a thread that
// returns early leaves both barriers, as an exited thread does on the GPU.
//
// What it cannot show: timing, races between blocks, and the GPU's own libm (expf differs by
// an ulp or two) and FMA contraction (g++ runs with -ffp-contract=off). The tests allow for
// those in their tolerances.
#pragma once
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};

inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static

namespace cuda_emu {

constexpr unsigned WARP = 32;

struct Warp {
  std::barrier<> barrier;
  float lanes[WARP] = {};
  unsigned launched;               // lanes the block gave this warp
  std::atomic<unsigned> exited{0};  // lanes that have returned
  explicit Warp(unsigned threads) : barrier(threads), launched(threads) {}
};

struct Block {
  std::barrier<> barrier;
  std::vector<std::unique_ptr<Warp>> warps;
  explicit Block(std::ptrdiff_t threads) : barrier(threads) {}
};

inline thread_local Block* block = nullptr;
inline thread_local unsigned linear_thread = 0;

inline Warp& my_warp() { return *block->warps[linear_thread / WARP]; }

// Runs `kernel` over the grid, one block at a time, each of its threads an OS thread.
template <typename Kernel>
void launch(dim3 grid, dim3 block_dim, Kernel kernel) {
  unsigned threads = block_dim.x * block_dim.y * block_dim.z;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        Block b(threads);
        for (unsigned w = 0; w * WARP < threads; ++w) {
          unsigned in_warp = threads - w * WARP < WARP ? threads - w * WARP : WARP;
          b.warps.push_back(std::make_unique<Warp>(in_warp));
        }
        std::vector<std::thread> pool;
        pool.reserve(threads);
        for (unsigned t = 0; t < threads; ++t) {
          pool.emplace_back([&, t] {
            block = &b;
            linear_thread = t;
            blockDim = block_dim;
            gridDim = grid;
            blockIdx = dim3{bx, by, bz};
            threadIdx = dim3{t % block_dim.x, (t / block_dim.x) % block_dim.y,
                             t / (block_dim.x * block_dim.y)};
            kernel();
            my_warp().exited.fetch_add(1);
            my_warp().barrier.arrive_and_drop();
            b.barrier.arrive_and_drop();
          });
        }
        for (auto& thread : pool) thread.join();
      }
}

}  // namespace cuda_emu

inline void __syncthreads() { cuda_emu::block->barrier.arrive_and_wait(); }

// The full-mask butterfly exchange the kernels use: every lane of the warp takes part. A warp
// short of 32 lanes, or one whose lanes have returned, is undefined on the GPU: it aborts here
// rather than read a stale lane.
inline float __shfl_xor_sync(unsigned /*mask*/, float v, int offset) {
  cuda_emu::Warp& warp = cuda_emu::my_warp();
  if (warp.launched != cuda_emu::WARP || warp.exited.load() != 0) {
    std::fprintf(stderr, "cuda-emu: __shfl_xor_sync in a warp of %u lanes, %u returned\n",
                 warp.launched, warp.exited.load());
    std::abort();
  }
  unsigned lane = cuda_emu::linear_thread % cuda_emu::WARP;
  warp.lanes[lane] = v;
  warp.barrier.arrive_and_wait();
  float other = warp.lanes[lane ^ (unsigned)offset];
  warp.barrier.arrive_and_wait();
  return other;
}

// Without FMA contraction (g++ runs with -ffp-contract=off), a plain product is __fmul_rn.
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
// IEEE square root and fused multiply-add, correctly rounded as CUDA's _rn intrinsics
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
