// The fused Adafactor step of a 1-D (or 0-D) tensor larger than
// AF_SMALL_LIMIT, in two dispatches: threadgroup gi covers elements
// [gi * AF_FLAT_BLOCK, +AF_FLAT_BLOCK).
//   sums   reads p, g, exp_avg_sq -> new exp_avg_sq, sum p^2, sum u^2
//   apply  reads p, g, new exp_avg_sq (, m) -> new p (, m)

#include "adafactor_kernels.h"

// Update exp_avg_sq of the block; sum p^2 and u^2.
template <typename T, typename U>
[[kernel]] void adafactor_flat_sums(
    const device float* step [[buffer(AF_BUF_STEP)]],
    const device float* learning_rate [[buffer(AF_BUF_LR)]],
    constant AdafactorHyper& hyper [[buffer(AF_BUF_HYPER)]],
    constant AdafactorTensorArgs& args [[buffer(AF_BUF_ARGS)]],
    const device T* p [[buffer(AF_BUF_P)]],
    const device U* g [[buffer(AF_BUF_G)]],
    const device float* sq_old [[buffer(AF_BUF_S0)]],
    device float* sq_out [[buffer(AF_BUF_S0_OUT)]],
    device float* group_part [[buffer(AF_BUF_GROUP_PART)]],
    uint3 tgid [[threadgroup_position_in_grid]],
    uint lid [[thread_index_in_threadgroup]],
    uint simd_lane [[thread_index_in_simdgroup]],
    uint simd_gid [[simdgroup_index_in_threadgroup]]) {
  threadgroup float tmp[AF_N_SIMD];
  const AdafactorHyper h = load_hyper(hyper);
  const AdafactorStepScalars s =
      adafactor_step_scalars(step[0], learning_rate[0], h);
  const int lo = int(tgid.x) * AF_FLAT_BLOCK;
  const int hi = min(args.n, lo + AF_FLAT_BLOCK);

  float p2 = 0.0f;
  float u2 = 0.0f;
  for (int e0 = lo + int(lid) * AF_N_READS; e0 < hi;
       e0 += AF_THREADS_PER_GROUP * AF_N_READS) {
    for (int k = 0; k < AF_N_READS; ++k) {
      const int e = e0 + k;
      if (e < hi) {
        const float pv = af_load(p, e);
        const float gv = af_load(g, e);
        p2 += pv * pv;
        const float sq = adafactor_ema(sq_old[e], adafactor_sq_grad(gv, h), s);
        sq_out[e] = sq;
        const float u = adafactor_flat_update(sq, gv);
        u2 += u * u;
      }
    }
  }

  // Accumulate over the threadgroup
  p2 = block_sum(p2, tmp, simd_lane, simd_gid);
  u2 = block_sum(u2, tmp, simd_lane, simd_gid);
  if (lid == 0) {
    device float* part = group_part + size_t(tgid.x) * AF_GROUP_PART_SIZE;
    part[AF_PART_P2] = p2;
    part[AF_PART_U2] = u2;
    part[2] = 0.0f;
    part[3] = 0.0f;
  }
}

// Clip, scale and apply the update of the block.
template <typename T, typename U>
[[kernel]] void adafactor_flat_apply(
    const device float* step [[buffer(AF_BUF_STEP)]],
    const device float* learning_rate [[buffer(AF_BUF_LR)]],
    constant AdafactorHyper& hyper [[buffer(AF_BUF_HYPER)]],
    constant AdafactorTensorArgs& args [[buffer(AF_BUF_ARGS)]],
    const device T* p [[buffer(AF_BUF_P)]],
    const device U* g [[buffer(AF_BUF_G)]],
    const device T* m [[buffer(AF_BUF_M)]],
    device T* p_out [[buffer(AF_BUF_P_OUT)]],
    const device float* sq [[buffer(AF_BUF_S0_OUT)]],
    device T* m_out [[buffer(AF_BUF_M_OUT)]],
    const device float* group_part [[buffer(AF_BUF_GROUP_PART)]],
    uint3 tgid [[threadgroup_position_in_grid]],
    uint lid [[thread_index_in_threadgroup]],
    uint simd_lane [[thread_index_in_simdgroup]],
    uint simd_gid [[simdgroup_index_in_threadgroup]]) {
  threadgroup float tmp[AF_N_SIMD];
  const AdafactorHyper h = load_hyper(hyper);
  const AdafactorStepScalars s =
      adafactor_step_scalars(step[0], learning_rate[0], h);
  const int lo = int(tgid.x) * AF_FLAT_BLOCK;
  const int hi = min(args.n, lo + AF_FLAT_BLOCK);
  const bool momentum = h.flags & AF_MOMENTUM;
  const AfStream p_stream = af_stream(h, args, step[0], AF_STREAM_PARAM);
  const AfStream m_stream = af_stream(h, args, step[0], AF_STREAM_EXP_AVG);

  // Tensor scalars from the partials of every block
  const float p2 = block_sum_parts(
      group_part, 0, args.n_groups, AF_GROUP_PART_SIZE, AF_PART_P2, tmp, lid,
      simd_lane, simd_gid);
  const float u2 = block_sum_parts(
      group_part, 0, args.n_groups, AF_GROUP_PART_SIZE, AF_PART_U2, tmp, lid,
      simd_lane, simd_gid);
  AdafactorTensorScalars ts;
  ts.lr = adafactor_tensor_lr(p2, args.inv_n, s, h);
  ts.clip_scale = adafactor_clip_scale(u2, args.inv_n, h);

  // Apply the update of the block
  for (int e0 = lo + int(lid) * AF_N_READS; e0 < hi;
       e0 += AF_THREADS_PER_GROUP * AF_N_READS) {
    for (int k = 0; k < AF_N_READS; ++k) {
      const int e = e0 + k;
      if (e < hi) {
        const float u = adafactor_flat_update(sq[e], af_load(g, e));
        float mv = momentum ? af_load(m, e) : 0.0f;
        const float pv = adafactor_apply(af_load(p, e), u, mv, ts, h);
        if (momentum) {
          af_store(m_out, e, mv, m_stream);
        }
        af_store(p_out, e, pv, p_stream);
      }
    }
  }
}

// clang-format off
#define instantiate_flat(pname, ptype, gname, gtype)                          \
  af_instantiate_kernel("adafactor_flat_sums_" #pname "_" #gname,             \
                        adafactor_flat_sums, ptype, gtype)                    \
  af_instantiate_kernel("adafactor_flat_apply_" #pname "_" #gname,            \
                        adafactor_flat_apply, ptype, gtype)

#define instantiate_flat_p(pname, ptype)                                      \
  instantiate_flat(pname, ptype, float32, float)                              \
  instantiate_flat(pname, ptype, float16, half)                               \
  instantiate_flat(pname, ptype, bfloat16, af_bfloat16)

instantiate_flat_p(float32, float)
instantiate_flat_p(float16, half)
instantiate_flat_p(bfloat16, af_bfloat16) // clang-format on
