// The fused Adafactor step of a factored tensor (ndim >= 2) in three
// dispatches on one grid (NOTE: [factored tiles] in adafactor_args.h):
//   sums   reads p, g      -> row/column partials of g^2 + eps1, sum p^2
//   norm   reads g         -> new row/column state and factors, sum u^2
//   apply  reads p, g (, m) -> new p (, m)
// NOTE: [three passes] in csrc/cpu/passes.h says why three.

#include "adafactor_kernels.h"

// Row and column sums of g^2 + eps1 over the tile, sum p^2, and (first
// column block) the sum of the old row state over the tile's rows. Each
// simdgroup takes every AF_N_SIMD-th row of the tile, so a row's sum is one
// simd_sum; the simdgroups' column sums meet in threadgroup memory.
template <typename T, typename U>
[[kernel]] void adafactor_factored_sums(
    const device T* p [[buffer(AF_BUF_P)]],
    const device U* g [[buffer(AF_BUF_G)]],
    const device float* row_old [[buffer(AF_BUF_S0)]],
    constant AdafactorHyper& hyper [[buffer(AF_BUF_HYPER)]],
    constant AdafactorTensorArgs& args [[buffer(AF_BUF_ARGS)]],
    device float* row_part [[buffer(AF_BUF_ROW_PART)]],
    device float* col_part [[buffer(AF_BUF_COL_PART)]],
    device float* group_part [[buffer(AF_BUF_GROUP_PART)]],
    uint3 tgid [[threadgroup_position_in_grid]],
    uint lid [[thread_index_in_threadgroup]],
    uint simd_lane [[thread_index_in_simdgroup]],
    uint simd_gid [[simdgroup_index_in_threadgroup]]) {
  constexpr int n_chunks = AF_COL_BLOCK / AF_CHUNK;
  threadgroup float tmp[AF_N_SIMD];
  threadgroup float tile_col[AF_COL_BLOCK];
  const AdafactorHyper h = load_hyper(hyper);
  const int R = args.rows;
  const int C = args.cols;
  const int b = tgid.z;
  const int i = tgid.y;
  const int j = tgid.x;
  const int r0 = i * args.row_block;
  const int r1 = min(R, r0 + args.row_block);
  const int c0 = j * AF_COL_BLOCK + int(simd_lane) * AF_N_READS;
  const size_t mat = size_t(b) * R;

  // Sum the simdgroup's rows; accumulate its columns in registers
  float col_acc[n_chunks][AF_N_READS];
  for (int q = 0; q < n_chunks; ++q) {
    for (int k = 0; k < AF_N_READS; ++k) {
      col_acc[q][k] = 0.0f;
    }
  }
  float p2 = 0.0f;
  float g2 = 0.0f;
  for (int r = r0 + int(simd_gid); r < r1; r += AF_N_SIMD) {
    const size_t base = (mat + r) * C;
    float rs = 0.0f;
    for (int q = 0; q < n_chunks; ++q) {
      for (int k = 0; k < AF_N_READS; ++k) {
        const int c = c0 + q * AF_CHUNK + k;
        if (c < C) {
          const float s = adafactor_sq_grad(af_load(g, base + c), h);
          col_acc[q][k] += s;
          rs += s;
          const float pv = af_load(p, base + c);
          p2 += pv * pv;
        }
      }
    }
    g2 += rs;
    rs = simd_sum(rs);
    if (simd_lane == 0) {
      row_part[(mat + r) * args.n_col_blocks + j] = rs;
    }
  }

  // Accumulate the columns over simdgroups, in simdgroup order
  for (int sg = 0; sg < AF_N_SIMD; ++sg) {
    if (int(simd_gid) == sg) {
      for (int q = 0; q < n_chunks; ++q) {
        for (int k = 0; k < AF_N_READS; ++k) {
          const int t = q * AF_CHUNK + int(simd_lane) * AF_N_READS + k;
          tile_col[t] = (sg == 0 ? 0.0f : tile_col[t]) + col_acc[q][k];
        }
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  for (int k = 0; k < AF_N_READS; ++k) {
    const int t = int(lid) * AF_N_READS + k;
    const int c = j * AF_COL_BLOCK + t;
    if (c < C) {
      col_part[(size_t(b) * args.n_row_blocks + i) * C + c] = tile_col[t];
    }
  }

  // Sum the old row state once per row, in the first column block
  float old = 0.0f;
  if (j == 0) {
    for (int r = r0 + int(lid); r < r1; r += AF_THREADS_PER_GROUP) {
      old += row_old[mat + r];
    }
  }

  // Accumulate over the threadgroup
  p2 = block_sum(p2, tmp, simd_lane, simd_gid);
  g2 = block_sum(g2, tmp, simd_lane, simd_gid);
  old = block_sum(old, tmp, simd_lane, simd_gid);
  if (lid == 0) {
    const size_t gi =
        (size_t(b) * args.n_row_blocks + i) * args.n_col_blocks + j;
    device float* part = group_part + gi * AF_GROUP_PART_SIZE;
    part[AF_PART_P2] = p2;
    part[AF_PART_G2] = g2;
    part[AF_PART_ROW_OLD] = old;
    part[AF_GROUP_PART_SIZE - 1] = 0.0f;
  }
}

// New row and column state and their factors for the tile (written once,
// by the first tile of each row and column), then sum u^2 of the tile.
template <typename T, typename U>
[[kernel]] void adafactor_factored_norm(
    const device float* step [[buffer(AF_BUF_STEP)]],
    const device float* learning_rate [[buffer(AF_BUF_LR)]],
    constant AdafactorHyper& hyper [[buffer(AF_BUF_HYPER)]],
    constant AdafactorTensorArgs& args [[buffer(AF_BUF_ARGS)]],
    const device U* g [[buffer(AF_BUF_G)]],
    const device float* row_old [[buffer(AF_BUF_S0)]],
    const device float* col_old [[buffer(AF_BUF_S1)]],
    device float* row_out [[buffer(AF_BUF_S0_OUT)]],
    device float* col_out [[buffer(AF_BUF_S1_OUT)]],
    const device float* row_part [[buffer(AF_BUF_ROW_PART)]],
    const device float* col_part [[buffer(AF_BUF_COL_PART)]],
    const device float* group_part [[buffer(AF_BUF_GROUP_PART)]],
    device float* row_fac [[buffer(AF_BUF_ROW_FAC)]],
    device float* col_fac [[buffer(AF_BUF_COL_FAC)]],
    device float* u2_part [[buffer(AF_BUF_U2_PART)]],
    uint3 tgid [[threadgroup_position_in_grid]],
    uint lid [[thread_index_in_threadgroup]],
    uint simd_lane [[thread_index_in_simdgroup]],
    uint simd_gid [[simdgroup_index_in_threadgroup]]) {
  threadgroup float tmp[AF_N_SIMD];
  threadgroup float tile_row_fac[AF_MAX_TILE_ROWS];
  const AdafactorHyper h = load_hyper(hyper);
  const AdafactorStepScalars s =
      adafactor_step_scalars(step[0], learning_rate[0], h);
  const int R = args.rows;
  const int C = args.cols;
  const int b = tgid.z;
  const int i = tgid.y;
  const int j = tgid.x;
  const int r0 = i * args.row_block;
  const int r1 = min(R, r0 + args.row_block);
  const int c = j * AF_COL_BLOCK + int(lid) * AF_N_READS;
  const size_t mat = size_t(b) * R;

  // Mean of the new row state of matrix b from the per-group sums:
  // sum_r (beta2 * old_r + (1 - beta2) * rowsum_r / C) / R
  const int groups = args.n_row_blocks * args.n_col_blocks;
  const int first = b * groups;
  const float old = block_sum_parts(
      group_part, first, first + groups, AF_GROUP_PART_SIZE,
      AF_PART_ROW_OLD, tmp, lid, simd_lane, simd_gid);
  const float g2 = block_sum_parts(
      group_part, first, first + groups, AF_GROUP_PART_SIZE, AF_PART_G2,
      tmp, lid, simd_lane, simd_gid);
  const float row_mean = adafactor_ema(old, g2 * args.inv_cols, s) * args.inv_rows;

  // Row state and factors of the tile's rows
  for (int r = r0 + int(lid); r < r1; r += AF_THREADS_PER_GROUP) {
    const size_t rr = mat + r;
    float sum = 0.0f;
    for (int k = 0; k < args.n_col_blocks; ++k) {
      sum += row_part[rr * args.n_col_blocks + k];
    }
    const float v = adafactor_ema(row_old[rr], sum * args.inv_cols, s);
    const float rf = adafactor_row_factor(v, row_mean);
    tile_row_fac[r - r0] = rf;
    if (j == 0) {
      row_out[rr] = v;
      row_fac[rr] = rf;
    }
  }

  // Column state and factors of the thread's columns
  float cf[AF_N_READS];
  for (int k = 0; k < AF_N_READS; ++k) {
    cf[k] = 0.0f;
    if (c + k < C) {
      float sum = 0.0f;
      for (int q = 0; q < args.n_row_blocks; ++q) {
        sum += col_part[(size_t(b) * args.n_row_blocks + q) * C + c + k];
      }
      const size_t cc = size_t(b) * C + c + k;
      const float v = adafactor_ema(col_old[cc], sum * args.inv_rows, s);
      cf[k] = adafactor_col_factor(v);
      if (i == 0) {
        col_out[cc] = v;
        col_fac[cc] = cf[k];
      }
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  // Sum u^2 of the tile
  float u2 = 0.0f;
  for (int r = r0; r < r1; ++r) {
    const float rf = tile_row_fac[r - r0];
    const size_t base = (mat + r) * C;
    for (int k = 0; k < AF_N_READS; ++k) {
      if (c + k < C) {
        const float u =
            adafactor_factored_update(rf, cf[k], af_load(g, base + c + k));
        u2 += u * u;
      }
    }
  }
  u2 = block_sum(u2, tmp, simd_lane, simd_gid);
  if (lid == 0) {
    u2_part[(size_t(b) * args.n_row_blocks + i) * args.n_col_blocks + j] = u2;
  }
}

// Clip, scale and apply the update of the tile.
template <typename T, typename U>
[[kernel]] void adafactor_factored_apply(
    const device float* step [[buffer(AF_BUF_STEP)]],
    const device float* learning_rate [[buffer(AF_BUF_LR)]],
    constant AdafactorHyper& hyper [[buffer(AF_BUF_HYPER)]],
    constant AdafactorTensorArgs& args [[buffer(AF_BUF_ARGS)]],
    const device T* p [[buffer(AF_BUF_P)]],
    const device U* g [[buffer(AF_BUF_G)]],
    const device T* m [[buffer(AF_BUF_M)]],
    device T* p_out [[buffer(AF_BUF_P_OUT)]],
    device T* m_out [[buffer(AF_BUF_M_OUT)]],
    const device float* group_part [[buffer(AF_BUF_GROUP_PART)]],
    const device float* row_fac [[buffer(AF_BUF_ROW_FAC)]],
    const device float* col_fac [[buffer(AF_BUF_COL_FAC)]],
    const device float* u2_part [[buffer(AF_BUF_U2_PART)]],
    uint3 tgid [[threadgroup_position_in_grid]],
    uint lid [[thread_index_in_threadgroup]],
    uint simd_lane [[thread_index_in_simdgroup]],
    uint simd_gid [[simdgroup_index_in_threadgroup]]) {
  threadgroup float tmp[AF_N_SIMD];
  const AdafactorHyper h = load_hyper(hyper);
  const AdafactorStepScalars s =
      adafactor_step_scalars(step[0], learning_rate[0], h);
  const int R = args.rows;
  const int C = args.cols;
  const int b = tgid.z;
  const int i = tgid.y;
  const int j = tgid.x;
  const int r0 = i * args.row_block;
  const int r1 = min(R, r0 + args.row_block);
  const int c = j * AF_COL_BLOCK + int(lid) * AF_N_READS;
  const size_t mat = size_t(b) * R;
  const bool momentum = h.flags & AF_MOMENTUM;
  const AfStream p_stream = af_stream(h, args, step[0], AF_STREAM_PARAM);
  const AfStream m_stream = af_stream(h, args, step[0], AF_STREAM_EXP_AVG);

  // Tensor scalars from the partials of every tile
  const float p2 = block_sum_parts(
      group_part, 0, args.n_groups, AF_GROUP_PART_SIZE, AF_PART_P2, tmp, lid,
      simd_lane, simd_gid);
  const float u2 = block_sum_parts(
      u2_part, 0, args.n_groups, 1, 0, tmp, lid, simd_lane, simd_gid);
  AdafactorTensorScalars ts;
  ts.lr = adafactor_tensor_lr(p2, args.inv_n, s, h);
  ts.clip_scale = adafactor_clip_scale(u2, args.inv_n, h);

  float cf[AF_N_READS];
  for (int k = 0; k < AF_N_READS; ++k) {
    cf[k] = c + k < C ? col_fac[size_t(b) * C + c + k] : 0.0f;
  }

  // Apply the update of the tile
  for (int r = r0; r < r1; ++r) {
    const float rf = row_fac[mat + r];
    const size_t base = (mat + r) * C;
    for (int k = 0; k < AF_N_READS; ++k) {
      if (c + k < C) {
        const size_t e = base + c + k;
        const float u = adafactor_factored_update(rf, cf[k], af_load(g, e));
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
#define instantiate_factored(pname, ptype, gname, gtype)                      \
  af_instantiate_kernel("adafactor_factored_sums_" #pname "_" #gname,         \
                        adafactor_factored_sums, ptype, gtype)                \
  af_instantiate_kernel("adafactor_factored_norm_" #pname "_" #gname,         \
                        adafactor_factored_norm, ptype, gtype)                \
  af_instantiate_kernel("adafactor_factored_apply_" #pname "_" #gname,        \
                        adafactor_factored_apply, ptype, gtype)

#define instantiate_factored_p(pname, ptype)                                  \
  instantiate_factored(pname, ptype, float32, float)                          \
  instantiate_factored(pname, ptype, float16, half)                           \
  instantiate_factored(pname, ptype, bfloat16, af_bfloat16)

instantiate_factored_p(float32, float)
instantiate_factored_p(float16, half)
instantiate_factored_p(bfloat16, af_bfloat16) // clang-format on
