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

#pragma once

#include "mlx/backend/metal/kernels/utils.h"

#include "adafactor_args.h"
#include "adafactor_math.h"

using namespace metal;

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
