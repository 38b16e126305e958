// CUDA's built-ins for kernels.cu compiled as C++ on a CPU (tests/cuda_executor.py builds it with
// g++ -include this file, -ffp-contract=off and AddressSanitizer + UndefinedBehaviorSanitizer).
// executor.cpp runs a launch's blocks one after another and a block's threads as fibers that
// meet at every __syncthreads; these are the names the kernel source sees.
#pragma once
#include <cmath>
#include <cstdint>

struct uint3 { unsigned int x, y, z; };
struct dim3 { unsigned int x, y, z; };

// The running thread's coordinates: set by the scheduler before it switches to a thread. Not
// const, and __syncthreads is an opaque call, so the compiler reloads them after each barrier.
extern uint3 threadIdx, blockIdx;
extern dim3 blockDim, gridDim;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
// One copy per block: a static local (blocks run one at a time). "used" keeps it in the symbol
// table, where the executor finds it (nm) to fill with garbage at each block's start; ASan puts
// red zones around it, so an index past its end is an error.
#define __shared__ static __attribute__((used))

extern "C" void __syncthreads();  // parks this thread until every live thread of the block is there

// Atomics: threads switch only at barriers, so a plain read-modify-write is atomic here.
template <typename T> inline T atomicAdd(T* address, T value) {
    T old = *address;
    *address = old + value;
    return old;
}

// The round-to-nearest intrinsics: one IEEE operation each (-ffp-contract=off keeps a * b + c
// two roundings, as the intrinsics promise on a GPU).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }

using std::signbit;
