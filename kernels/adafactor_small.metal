// The fused Adafactor step of a tensor of at most AF_SMALL_LIMIT elements in
// one threadgroup and one dispatch: the passes of the larger kernels run one
// after another, separated by barriers on device memory.

#include "adafactor_kernels.h"

// A factored tensor (B matrices of R x C). Scratch: row factors [B * R],
// column factors [B * C], row means [B] (in AF_BUF_GROUP_PART).
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
    uint lid [[thread_index_in_threadgroup]],
    uint simd_lane [[thread_index_in_simdgroup]],
    uint simd_gid [[simdgroup_index_in_threadgroup]]) {
  threadgroup float tmp[AF_N_SIMD];
  const AdafactorHyper h = load_hyper(hyper);
  const AdafactorStepScalars s =
      adafactor_step_scalars(step[0], learning_rate[0], h);
  const int n = args.n;
  const int B = args.batch;
  const int R = args.rows;
  const int C = args.cols;
  const bool momentum = h.flags & AF_MOMENTUM;
  const AfStream p_stream = af_stream(h, args, step[0], AF_STREAM_PARAM);
  const AfStream m_stream = af_stream(h, args, step[0], AF_STREAM_EXP_AVG);

  // Sum p^2
  float p2 = 0.0f;
  for (int e = int(lid); e < n; e += AF_THREADS_PER_GROUP) {
    const float pv = af_load(p, e);
    p2 += pv * pv;
  }

  // Row state: one thread per row
  for (int rr = int(lid); rr < B * R; rr += AF_THREADS_PER_GROUP) {
    float sum = 0.0f;
    for (int c = 0; c < C; ++c) {
      sum += adafactor_sq_grad(af_load(g, rr * C + c), h);
    }
    row_out[rr] = adafactor_ema(row_old[rr], sum * args.inv_cols, s);
  }

  // Column state and factors: one thread per column
  for (int cc = int(lid); cc < B * C; cc += AF_THREADS_PER_GROUP) {
    const int b = cc / C;
    const int c = cc - b * C;
    float sum = 0.0f;
    for (int r = 0; r < R; ++r) {
      sum += adafactor_sq_grad(af_load(g, (b * R + r) * C + c), h);
    }
    const float v = adafactor_ema(col_old[cc], sum * args.inv_rows, s);
    col_out[cc] = v;
    col_fac[cc] = adafactor_col_factor(v);
  }
  p2 = block_sum(p2, tmp, simd_lane, simd_gid);
  threadgroup_barrier(mem_flags::mem_device);

  // Mean of the new row state: one thread per matrix
  for (int b = int(lid); b < B; b += AF_THREADS_PER_GROUP) {
    float sum = 0.0f;
    for (int r = 0; r < R; ++r) {
      sum += row_out[b * R + r];
    }
    row_mean[b] = sum * args.inv_rows;
  }
  threadgroup_barrier(mem_flags::mem_device);

  // Row factors
  for (int rr = int(lid); rr < B * R; rr += AF_THREADS_PER_GROUP) {
    row_fac[rr] = adafactor_row_factor(row_out[rr], row_mean[rr / R]);
  }
  threadgroup_barrier(mem_flags::mem_device);

  // Sum u^2
  float u2 = 0.0f;
  for (int e = int(lid); e < n; e += AF_THREADS_PER_GROUP) {
    const int rr = e / C;
    const int cc = (rr / R) * C + (e - rr * C);
    const float u = adafactor_factored_update(
        row_fac[rr], col_fac[cc], af_load(g, e));
    u2 += u * u;
  }
  u2 = block_sum(u2, tmp, simd_lane, simd_gid);
  AdafactorTensorScalars ts;
  ts.lr = adafactor_tensor_lr(p2, args.inv_n, s, h);
  ts.clip_scale = adafactor_clip_scale(u2, args.inv_n, h);

  // Apply the update
  for (int e = int(lid); e < n; e += AF_THREADS_PER_GROUP) {
    const int rr = e / C;
    const int cc = (rr / R) * C + (e - rr * C);
    const float u = adafactor_factored_update(
        row_fac[rr], col_fac[cc], af_load(g, e));
    float mv = momentum ? af_load(m, e) : 0.0f;
    const float pv = adafactor_apply(af_load(p, e), u, mv, ts, h);
    if (momentum) {
      af_store(m_out, e, mv, m_stream);
    }
    af_store(p_out, e, pv, p_stream);
  }
}

// A 1-D (or 0-D) tensor.
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
  threadgroup float tmp[AF_N_SIMD];
  const AdafactorHyper h = load_hyper(hyper);
  const AdafactorStepScalars s =
      adafactor_step_scalars(step[0], learning_rate[0], h);
  const int n = args.n;
  const bool momentum = h.flags & AF_MOMENTUM;
  const AfStream p_stream = af_stream(h, args, step[0], AF_STREAM_PARAM);
  const AfStream m_stream = af_stream(h, args, step[0], AF_STREAM_EXP_AVG);

  // Update exp_avg_sq; sum p^2 and u^2
  float p2 = 0.0f;
  float u2 = 0.0f;
  for (int e = int(lid); e < n; e += AF_THREADS_PER_GROUP) {
    const float pv = af_load(p, e);
    const float gv = af_load(g, e);
    p2 += pv * pv;
    const float sq = adafactor_ema(sq_old[e], adafactor_sq_grad(gv, h), s);
    sq_out[e] = sq;
    const float u = adafactor_flat_update(sq, gv);
    u2 += u * u;
  }
  p2 = block_sum(p2, tmp, simd_lane, simd_gid);
  u2 = block_sum(u2, tmp, simd_lane, simd_gid);
  AdafactorTensorScalars ts;
  ts.lr = adafactor_tensor_lr(p2, args.inv_n, s, h);
  ts.clip_scale = adafactor_clip_scale(u2, args.inv_n, h);

  // Apply the update; each thread reads back the exp_avg_sq it wrote
  for (int e = int(lid); e < n; e += AF_THREADS_PER_GROUP) {
    const float u = adafactor_flat_update(sq_out[e], af_load(g, e));
    float mv = momentum ? af_load(m, e) : 0.0f;
    const float pv = adafactor_apply(af_load(p, e), u, mv, ts, h);
    if (momentum) {
      af_store(m_out, e, mv, m_stream);
    }
    af_store(p_out, e, pv, p_stream);
  }
}

// clang-format off
#define instantiate_small(pname, ptype, gname, gtype)                         \
  af_instantiate_kernel("adafactor_small_factored_" #pname "_" #gname,        \
                        adafactor_small_factored, ptype, gtype)               \
  af_instantiate_kernel("adafactor_small_flat_" #pname "_" #gname,            \
                        adafactor_small_flat, ptype, gtype)

#define instantiate_small_p(pname, ptype)                                     \
  instantiate_small(pname, ptype, float32, float)                             \
  instantiate_small(pname, ptype, float16, half)                              \
  instantiate_small(pname, ptype, bfloat16, af_bfloat16)

instantiate_small_p(float32, float)
instantiate_small_p(float16, half)
instantiate_small_p(bfloat16, af_bfloat16) // clang-format on
