// Just enough of CUDA, in host C++20, to run csrc/solve_cuda.cu without a GPU: every CUDA thread
// of a block is a std::thread, __syncthreads() is a std::barrier, blocks run one after another
// in blockIdx order (the solve kernel's ticket order, so a strip never waits for a block that
// has not run), shared memory is filled with 0xFF bytes (NaN) so that reading anything not
// written first shows up in the results. Memory-model details (fences, cache bypass) are not
// emulated: this checks indexing, orientation, strips, halos, the column ring and the planner.
#pragma once

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <thread>
#include <vector>

#define INVCONV_CUDA_EMULATION 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(16) double2 {
  double x, y;
};

struct EmuDim3 {
  unsigned x = 1, y = 1, z = 1;
};
inline thread_local EmuDim3 threadIdx, blockIdx;
inline EmuDim3 blockDim, gridDim;

namespace emu {
inline std::vector<unsigned char>& dynamic_smem() {
  static std::vector<unsigned char> buf;
  return buf;
}
inline std::barrier<>*& block_barrier() {
  static std::barrier<>* bar = nullptr;
  return bar;
}
inline int smem_limit() {
  const char* env = std::getenv("EMU_SMEM_LIMIT");
  return env ? std::atoi(env) : 232448;  // an H100's opt-in limit per block
}
}  // namespace emu

#define INVCONV_DYNAMIC_SHARED(name) unsigned char* name = emu::dynamic_smem().data()

inline void __syncthreads() { emu::block_barrier()->arrive_and_wait(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __nanosleep(unsigned) { std::this_thread::yield(); }
template <class T>
inline T __ldcg(const T* p) {
  return *p;
}
inline int atomicAdd(int* p, int v) { return std::atomic_ref<int>(*p).fetch_add(v); }
using std::fma;
using std::max;
using std::min;

namespace cuda {
enum thread_scope { thread_scope_device };
using std::memory_order_acquire;
using std::memory_order_release;
template <class T, thread_scope>
struct atomic_ref {
  std::atomic_ref<T> ref;
  explicit atomic_ref(T& t) : ref(t) {}
  T load(std::memory_order m) const { return ref.load(m); }
  void store(T v, std::memory_order m) const { ref.store(v, m); }
};
}  // namespace cuda

typedef void* cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
inline const char* cudaGetErrorName(cudaError_t e) { return e == cudaSuccess ? "cudaSuccess" : "cudaErrorInvalidValue"; }
inline const char* cudaGetErrorString(cudaError_t e) {
  return e == cudaSuccess ? "no error" : "invalid argument";
}
namespace emu {
// As on a device: the last error of a failed call or launch, reported and cleared by
// cudaGetLastError; dynamic shared memory above 48 KB only after cudaFuncSetAttribute.
inline cudaError_t& last_error() {
  static cudaError_t e = cudaSuccess;
  return e;
}
inline std::map<const void*, int>& allowed_smem() {
  static std::map<const void*, int> m;
  return m;
}
inline int& attribute_calls() {
  static int n = 0;
  return n;
}
}  // namespace emu
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr, int) {
  *v = emu::smem_limit();
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t) {
  std::memset(p, v, n);
  return cudaSuccess;
}
template <class F>
inline cudaError_t cudaFuncSetAttribute(F f, cudaFuncAttribute, int bytes) {
  ++emu::attribute_calls();
  // EMU_FAIL_ATTRIBUTE=1: the call fails, to test how errors are reported.
  if (bytes > emu::smem_limit() || std::getenv("EMU_FAIL_ATTRIBUTE")) return emu::last_error() = cudaErrorInvalidValue;
  emu::allowed_smem()[reinterpret_cast<const void*>(f)] = bytes;
  return cudaSuccess;
}
inline cudaError_t cudaGetLastError() {
  const cudaError_t e = emu::last_error();
  emu::last_error() = cudaSuccess;
  return e;
}

namespace emu {
template <class... P, class... A>
void launch(void (*kernel)(P...), unsigned grid, unsigned block, size_t smem, A... args) {
  const auto it = allowed_smem().find(reinterpret_cast<const void*>(kernel));
  if (smem > 48 * 1024 && (it == allowed_smem().end() || static_cast<size_t>(it->second) < smem)) {
    last_error() = cudaErrorInvalidValue;  // a real launch fails the same way
    return;
  }
  gridDim.x = grid;
  blockDim.x = block;
  for (unsigned b = 0; b < grid; ++b) {
    dynamic_smem().assign(smem + 16, 0xFF);
    std::barrier<> bar(block);
    block_barrier() = &bar;
    std::vector<std::thread> threads;
    threads.reserve(block);
    for (unsigned t = 0; t < block; ++t)
      threads.emplace_back([=] {
        threadIdx.x = t;
        blockIdx.x = b;
        kernel(args...);
      });
    for (auto& th : threads) th.join();
  }
}
}  // namespace emu

#define INVCONV_LAUNCH(kernel, grid, block, smem, stream, ...) emu::launch(kernel, grid, block, smem, __VA_ARGS__)
