// Kernels with planted faults, for the tests that show the emulator reports
// them (test_metal_schedule.py). They take the names and bindings of two
// kernels of kernels/adafactor_small.metal, so that the package's own plan
// and encoding launch them: a one-threadgroup 1-D tensor runs
// adafactor_small_flat, a one-threadgroup matrix adafactor_small_factored.
// Built alone into an emulator of its own, float32 only.

#include "adafactor_kernels.h"

// The fault is chosen by the step count of the job:
//   1  a loop whose counter never advances (a `+=` become `=`)
//   2  simd_sum called by half of each simdgroup
//   3  half of the threads return before a threadgroup barrier
//   else no fault: copy the parameter
template <typename T, typename U>
[[kernel]] void adafactor_small_flat(
    const device float* step [[buffer(AF_BUF_STEP)]],
    const device float* learning_rate [[buffer(AF_BUF_LR)]],
    constant AdafactorHyper& hyper [[buffer(AF_BUF_HYPER)]],
    constant AdafactorTensorArgs& args [[buffer(AF_BUF_ARGS)]],
    const device T* p [[buffer(AF_BUF_P)]],
    const device U* g [[buffer(AF_BUF_G)]],
    const device float* sq_old [[buffer(AF_BUF_S0)]],
    const device T* m [[buffer(AF_BUF_M)]],
    device T* p_out [[buffer(AF_BUF_P_OUT)]],
    device float* sq_out [[buffer(AF_BUF_S0_OUT)]],
    device T* m_out [[buffer(AF_BUF_M_OUT)]],
    uint lid [[thread_index_in_threadgroup]],
    uint simd_lane [[thread_index_in_simdgroup]],
    uint simd_gid [[simdgroup_index_in_threadgroup]]) {
  const int fault = int(step[0]);
  float acc = 0.0f;
  if (fault == 1) {
    for (int r = 0; r < args.n; r = AF_N_SIMD) {
      acc = simd_sum(acc + 1.0f);
    }
  }
  if (fault == 2 && simd_lane < 16) {
    acc = simd_sum(acc);
  }
  if (fault == 3 && lid >= uint(AF_THREADS_PER_GROUP / 2)) {
    return;
  }
  threadgroup_barrier(mem_flags::mem_device);
  for (int e = int(lid); e < args.n; e += AF_THREADS_PER_GROUP) {
    af_store(p_out, e, af_load(p, e) + acc);
    sq_out[e] = sq_old[e];
  }
}

// 36 KiB of threadgroup memory, more than Metal's 32 KiB.
template <typename T, typename U>
[[kernel]] void adafactor_small_factored(
    const device float* step [[buffer(AF_BUF_STEP)]],
    const device float* learning_rate [[buffer(AF_BUF_LR)]],
    constant AdafactorHyper& hyper [[buffer(AF_BUF_HYPER)]],
    constant AdafactorTensorArgs& args [[buffer(AF_BUF_ARGS)]],
    const device T* p [[buffer(AF_BUF_P)]],
    const device U* g [[buffer(AF_BUF_G)]],
    const device float* row_old [[buffer(AF_BUF_S0)]],
    const device float* col_old [[buffer(AF_BUF_S1)]],
    const device T* m [[buffer(AF_BUF_M)]],
    device T* p_out [[buffer(AF_BUF_P_OUT)]],
    device float* row_out [[buffer(AF_BUF_S0_OUT)]],
    device float* col_out [[buffer(AF_BUF_S1_OUT)]],
    device T* m_out [[buffer(AF_BUF_M_OUT)]],
    device float* row_mean [[buffer(AF_BUF_GROUP_PART)]],
    device float* row_fac [[buffer(AF_BUF_ROW_FAC)]],
    device float* col_fac [[buffer(AF_BUF_COL_FAC)]],
    uint lid [[thread_index_in_threadgroup]]) {
  threadgroup float big[9216];
  big[lid] = af_load(p, lid % uint(args.n));
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (int e = int(lid); e < args.n; e += AF_THREADS_PER_GROUP) {
    af_store(p_out, e, big[e % AF_THREADS_PER_GROUP]);
  }
}

// clang-format off
af_instantiate_kernel("adafactor_small_flat_float32_float32",
                      adafactor_small_flat, float, float)
af_instantiate_kernel("adafactor_small_factored_float32_float32",
                      adafactor_small_factored, float, float) // clang-format on
