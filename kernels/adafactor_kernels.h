// Helpers of the Metal kernels of the fused Adafactor step (Metal only).
//
// Kernels, by file; every kernel runs AF_THREADS_PER_GROUP threads per
// threadgroup and is instantiated for each (parameter, gradient) pair of
// float32, float16 and bfloat16 as "<kernel>_<param type>_<grad type>":
//   adafactor_factored.metal  ndim >= 2, three dispatches on one tiled grid
//     adafactor_factored_sums   row/column sums of g^2 + eps1, sum p^2
//     adafactor_factored_norm   state EMAs, row/column factors, sum u^2
//     adafactor_factored_apply  clip, lr, momentum, weight decay, write p
//   adafactor_flat.metal      ndim < 2, two dispatches on a 1-D grid
//     adafactor_flat_sums       exp_avg_sq EMA, sum p^2, sum u^2
//     adafactor_flat_apply      clip, lr, momentum, weight decay, write p
//   adafactor_small.metal     at most AF_SMALL_LIMIT elements, one
//                             threadgroup, one dispatch, barriers between
//                             the passes
//     adafactor_small_factored
//     adafactor_small_flat
// NOTE: [deterministic sums] Every sum has a fixed order: simd_sum within a
// simdgroup, then simd_sum of the simdgroup totals, and partials of separate
// threadgroups are added by the next kernel in index order. No atomics.
//
// NOTE: [self-contained kernels]
// The kernels include only <metal_stdlib> and this directory's headers: the
// build flattens them into one source (kernels/embed_metal.py) that is compiled
// at run time with no include path when there is no .metallib (NOTE:
// [kernel library] in csrc/metal/host.cpp). Hence their own instantiation
// macro below and their own bfloat16 (NOTE: [bfloat16 storage]) instead of
// MLX's kernels/utils.h, which would pull MLX's whole kernel header set into
// every run-time compile.

#pragma once

#include "adafactor_args.h"
#include "adafactor_math.h"

using namespace metal;

// Instantiate kernel template `func` for the template arguments that follow,
// under the host name `name` (MLX's instantiate_kernel, spelled out).
// The CPU emulation of tests/metal defines its own before including this.
#ifndef af_instantiate_kernel
// clang-format off
#define af_instantiate_kernel(name, func, ...) \
  template [[host_name(name)]] [[kernel]] decltype(func<__VA_ARGS__>) func<__VA_ARGS__>;
// clang-format on
#endif

// NOTE: [bfloat16 storage]
// A bfloat16 tensor is bound as af_bfloat16, its raw 16 bits, and converted
// by af_bf16_to_float / af_float_to_bf16 of adafactor_math.h: the CPU path's
// conversions and MLX's CPU bfloat16_t, bit for bit (round to nearest even,
// NaN as 0x7FC0). Metal's native `bfloat` would also do for MLX 0.32 (its
// run-time compiles use Metal 3.1 or later), but its rounding of NaN is
// Apple's to choose, and the CPU emulation would run a test double of it;
// this way the emulation runs the conversion that ships. A struct, not a
// bare ushort, so that a static_cast of a raw value does not compile.
struct af_bfloat16 {
  uint16_t bits;
};

// Load element i of a parameter, gradient or moment as float; store one,
// rounded once (NOTE: [bfloat16 storage]).
inline float af_load(const device float* x, size_t i) {
  return x[i];
}
inline float af_load(const device half* x, size_t i) {
  return static_cast<float>(x[i]);
}
inline float af_load(const device af_bfloat16* x, size_t i) {
  return af_bf16_to_float(x[i].bits);
}
inline void af_store(device float* x, size_t i, float v) {
  x[i] = v;
}
inline void af_store(device half* x, size_t i, float v) {
  x[i] = static_cast<half>(v);
}
inline void af_store(device af_bfloat16* x, size_t i, float v) {
  x[i].bits = af_float_to_bf16(v);
}

// One stream of new values of a tensor (its parameter or its exp_avg), and
// whether its 16-bit stores round stochastically (NOTE: [stochastic
// rounding] in adafactor_math.h).
struct AfStream {
  uint32_t key;
  bool stochastic;
};

inline AfStream af_stream(
    AdafactorHyper h,
    constant AdafactorTensorArgs& args,
    float step,
    uint32_t stream) {
  AfStream s;
  s.stochastic = (h.flags & AF_STOCHASTIC_ROUNDING) != 0;
  s.key = adafactor_stream_key(args.key, uint32_t(step), stream);
  return s;
}

// Store element i of a stream: as af_store, but a 16-bit value rounded
// stochastically from float when the stream asks for it.
inline void af_store(device float* x, size_t i, float v, AfStream) {
  x[i] = v;
}
inline void af_store(device half* x, size_t i, float v, AfStream s) {
  if (s.stochastic) {
    v = adafactor_round_f16(
        v, adafactor_random_bits(s.key, uint32_t(i), uint32_t(i >> 32)));
  }
  x[i] = static_cast<half>(v);
}
inline void af_store(device af_bfloat16* x, size_t i, float v, AfStream s) {
  if (s.stochastic) {
    v = adafactor_round_bf16(
        v, adafactor_random_bits(s.key, uint32_t(i), uint32_t(i >> 32)));
  }
  x[i].bits = af_float_to_bf16(v);
}

static constant constexpr int AF_N_SIMD = AF_THREADS_PER_GROUP / AF_SIMD_SIZE;

// Copy the hyper-parameters into thread storage, field by field (a struct
// in the constant address space does not bind to the math's by-value
// parameters).
inline AdafactorHyper load_hyper(constant AdafactorHyper& h) {
  AdafactorHyper x;
  x.eps1 = h.eps1;
  x.eps2 = h.eps2;
  x.clip_threshold = h.clip_threshold;
  x.decay_rate = h.decay_rate;
  x.beta1 = h.beta1;
  x.one_minus_beta1 = h.one_minus_beta1;
  x.weight_decay = h.weight_decay;
  x.flags = h.flags;
  x.seed = h.seed;
  return x;
}

// Sum `v` over the threadgroup; every thread returns the total
// (NOTE: [deterministic sums]). `tmp` holds AF_N_SIMD floats; the trailing
// barrier lets the next call reuse it.
inline float block_sum(
    float v,
    threadgroup float* tmp,
    uint simd_lane,
    uint simd_gid) {
  v = simd_sum(v);
  if (simd_lane == 0) {
    tmp[simd_gid] = v;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  v = simd_sum(simd_lane < uint(AF_N_SIMD) ? tmp[simd_lane] : 0.0f);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  return v;
}

// Sum x[k * stride + offset] for k in [begin, end) over the threadgroup.
inline float block_sum_parts(
    const device float* x,
    int begin,
    int end,
    int stride,
    int offset,
    threadgroup float* tmp,
    uint lid,
    uint simd_lane,
    uint simd_gid) {
  float acc = 0.0f;
  for (int k = begin + int(lid); k < end; k += AF_THREADS_PER_GROUP) {
    acc += x[size_t(k) * stride + offset];
  }
  return block_sum(acc, tmp, simd_lane, simd_gid);
}
