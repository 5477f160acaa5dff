// The passes of the CPU step over one work item (NOTE: [tiles]).
//
// NOTE: [three passes]
// A factored tensor needs the row and column means of g^2 + eps1 before it
// can form the update, and the RMS of the whole update before it can clip it:
//   pass 1  sum(p^2), row and column sums of g^2 + eps1        (reads p, g)
//   --      row/column EMAs and rsqrt factors, O(rows + cols)
//   pass 2  sum(u^2) of the unclipped update                   (reads g)
//   pass 3  clip, lr, momentum, weight decay, write p          (reads p, g)
// A non-factored tensor updates its second moment element-wise, so pass 1
// also writes exp_avg_sq and sums u^2, and pass 2 is skipped. Pass 2 is
// also skipped for most factored tensors, see NOTE: [folded update sum].
//
// NOTE: [folded update sum]
// With u_ij = rf_i cf_j g_ij, rf_i^2 = mean(r) / r_i and cf_j^2 = 1 / c_j,
//   sum(u^2) = mean(r) * sum_j cf_j^2 * T_j,   T_j = sum_i g_ij^2 / r_i,
// and r_i (the new row EMA) is known as soon as row i has been summed. When
// a tile spans whole rows (C <= AF_CPU_COL_BLOCK), pass 1 therefore re-reads
// each row from cache right after summing it and accumulates T_j as column
// partials; the O(cols) rest is done with the factors. That saves pass 2, a
// full read of g (about a fifth of the bytes of a float32 step). The sum
// differs from pass 2's by rounding only (a few ulps: the same terms,
// associated differently). Where the shortcut could lose range (a row EMA
// below kFoldMinRow, so 1/r_i could overflow; any NaN or Inf) the tensor
// runs pass 2 instead, so special values behave exactly as in stock.
//
// NOTE: [chunked sums]
// A float32 running sum over n terms loses about sqrt(n) ulps; a tile of a
// tall matrix (N, 1) holds 65536 rows, which made its column sums and
// sum(p^2) as inexact as MLX's own reductions (~2e-5 relative). Sums
// therefore run in chunks of kSumChunk rows (or elements, or columns of a
// row wider than a chunk), and the chunk sums are folded into the tile's
// sum. Sums between the passes take chunked_sum (chunks of kSumChunk terms,
// their sums added pairwise): the tiles' partial sums, a row's column-block
// partials, and the mean of the row state, whose chunk sums of kSumChunk
// rows are formed as the rows are. Every order is fixed by the shapes
// alone, never by the threads. Combines of at most AF_CPU_MAX_ROW_BLOCKS
// (< kSumChunk) row-block partials are one chunk, and the folded sum(u^2)
// adds in double.
//
// NOTE: [simd clones]
// The passes are built twice on x86-64, for the baseline (SSE2) and for
// AVX2, and the loader picks the clone the machine supports. AVX2 doubles
// the lanes of the bfloat16 conversions and of the arithmetic; float16 (and
// bfloat16 in pass 3) is converted outside the loops (NOTE: [float16
// blocks]).

#pragma once

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "adafactor_math.h"
#include "cpu/convert.h"
#include "cpu/faults.h"
#include "cpu/rounding.h"
#include "cpu/tensor.h"
#include "cpu/types.h"

namespace mlx_fused_adafactor::cpu {

// Sanitizer builds take one clone: ifunc resolvers run before the
// sanitizer runtime is set up.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && \
    !defined(__SANITIZE_ADDRESS__)
#define AF_SIMD_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define AF_SIMD_CLONES
#endif

#if defined(__GNUC__)
#define AF_INLINE inline __attribute__((always_inline))
#else
#define AF_INLINE inline
#endif

// NOTE: [chunked sums]
constexpr int64_t kSumChunk = 256;

// The sum of one chunk, get(i) for i in [lo, hi), in order.
template <typename F>
inline float sum_chunk(int64_t lo, int64_t hi, const F& get) {
  float s = 0.0f;
  for (int64_t i = lo; i < hi; ++i) {
    s += get(i);
  }
  return s;
}

// Chunks of kSumChunk terms from lo, their sums added pairwise.
template <typename F>
float sum_chunks_pairwise(int64_t lo, int64_t hi, const F& get) {
  if (hi - lo <= kSumChunk) {
    return sum_chunk(lo, hi, get);
  }
  const int64_t chunks = (hi - lo + kSumChunk - 1) / kSumChunk;
  const int64_t mid = lo + chunks / 2 * kSumChunk;
  return sum_chunks_pairwise(lo, mid, get) + sum_chunks_pairwise(mid, hi, get);
}

// The sum of get(i) for i in [lo, hi) (NOTE: [chunked sums]); one chunk is
// summed inline.
template <typename F>
inline float chunked_sum(int64_t lo, int64_t hi, const F& get) {
  return hi - lo <= kSumChunk ? sum_chunk(lo, hi, get)
                              : sum_chunks_pairwise(lo, hi, get);
}

// NOTE: [folded update sum]: the smallest row EMA the fold takes.
constexpr float kFoldMinRow = 1e-32f;

template <typename T>
inline float load(const T* x, int64_t i) {
  return to_float(x[i]);
}

template <typename T>
inline void store(T* x, int64_t i, float v) {
  x[i] = from_float<T>(v);
}

// NOTE: [float16 blocks]: rows of at most this many elements are staged
// whole (the row sums run over them); pass 3 stages kStageBlock at a time.
constexpr int64_t kStageBlock = 2048;

// A per-thread buffer of at least `n` floats for staged float16 data
// (NOTE: [float16 blocks]); slot 0 for pass 3's blocks, 1 for whole rows.
inline float* stage_buffer(int slot, size_t n) {
  thread_local std::vector<float> buffers[2];
  auto& b = buffers[slot];
  if (b.size() < n) {
    b.resize(n);
  }
  return b.data();
}

// Whether any of the storage types is float16.
template <typename... T>
constexpr bool any_f16 = (std::is_same_v<T, f16> || ...);

// `n` values at `x` as the loops read them: float16 converted into `buf`
// (NOTE: [float16 blocks]), and bfloat16 too where `Bf16` (pass 3), any
// other storage where it is.
template <bool Bf16 = false, typename T>
inline auto staged(const T* x, int64_t n, float* buf) {
  if constexpr (std::is_same_v<T, f16>) {
    halves_to_floats(x, buf, n);
    return static_cast<const float*>(buf);
  } else if constexpr (Bf16 && std::is_same_v<T, bf16>) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      buf[i] = to_float(x[i]);
    }
    return static_cast<const float*>(buf);
  } else {
    return x;
  }
}

// Where the loops write `n` values bound for `x`: a float buffer for the
// 16-bit types staged above, written back by store_halves; any other
// storage itself.
template <bool Bf16 = false, typename T>
inline auto staging_out(T* x, float* buf) {
  if constexpr (std::is_same_v<T, f16> || (Bf16 && std::is_same_v<T, bf16>)) {
    return buf;
  } else {
    return x;
  }
}

template <bool Bf16 = false, typename T, typename S>
inline void store_halves(T* x, const S* staged_out, int64_t n) {
  if constexpr (std::is_same_v<T, f16>) {
    floats_to_halves(staged_out, x, n);
  } else if constexpr (Bf16 && std::is_same_v<T, bf16>) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      x[i] = from_float<bf16>(staged_out[i]);
    }
  }
}

// Whether pass 3 stages: any 16-bit storage type.
template <typename... T>
constexpr bool any_16bit =
    ((std::is_same_v<T, f16> || std::is_same_v<T, bf16>) || ...);

// Per-thread sums of one chunk of rows: column sums of g^2 + eps1, then the
// T_j of NOTE: [folded update sum]. On the heap: 128 KiB is too much for
// some thread stacks (512 KiB on macOS).
inline float* chunk_buffer() {
  thread_local std::vector<float> buffer(2 * AF_CPU_COL_BLOCK);
  return buffer.data();
}

// The new row EMA of row `rr` from the sum of its g^2 + eps1.
template <typename P, typename G>
inline float new_row(
    const TensorData<P, G>& x,
    const TensorPlan& t,
    int64_t rr,
    float row_sum,
    const AdafactorStepScalars& s) {
  return adafactor_ema(x.row[rr], row_sum * t.geo.inv_cols, s);
}

// Columns [c0, c1) of a row (p and g, loaded or staged) into pass 1's sums: rs += the
// row's g^2 + eps1, col_chunk[c] += the column's (the first col_w columns),
// ps += p^2. Always inlined, so it takes the caller's clone
// (NOTE: [simd clones]).
template <typename PP, typename GP>
AF_INLINE void sum_row(
    const PP* p,
    const GP* g,
    const AdafactorHyper& h,
    int64_t c0,
    int64_t c1,
    int64_t col_w,
    float* col_chunk,
    float& rs,
    float& ps) {
  float r = rs;
  float q = ps;
#pragma omp simd reduction(+ : r, q)
  for (int64_t c = c0; c < c1; ++c) {
    const float sg = adafactor_sq_grad(load(g, c), h);
    r += sg;
    col_chunk[c] += c < col_w ? sg : 0.0f;
    const float pv = load(p, c);
    q += pv * pv;
  }
  rs = r;
  ps = q;
}

// Pass 1 of a factored tile: row sums, column partials, sum(p^2) and, when
// the tile spans whole rows, the T_j partials (NOTE: [folded update sum]).
template <typename P, typename G>
AF_SIMD_CLONES ItemSums pass1_factored(
    const TensorData<P, G>& x,
    const TensorPlan& t,
    const Item& it,
    const AdafactorHyper h,
    const AdafactorStepScalars s,
    float* scratch) {
  const Geometry& geo = t.geo;
  const TileRange tile = tile_range(t.tiles, geo.rows, geo.cols, it);
  const int64_t w = tile.c1 - tile.c0;
  const int64_t mat = static_cast<int64_t>(it.matrix) * geo.rows;
  const size_t part =
      (it.matrix * t.tiles.n_row_blocks + it.row_block) * geo.cols + tile.c0;
  float* col = scratch + t.scratch.col_part + part;
  float* fold = scratch + t.scratch.fold_part + part;
  float* row_part = scratch + t.scratch.row_part;
  std::fill(col, col + w, 0.0f);
  if (t.fold) {
    std::fill(fold, fold + w, 0.0f);
  }
  ItemSums sums;
  sums.fold_ok = true;
  float* col_chunk = chunk_buffer();
  float* fold_chunk = col_chunk + AF_CPU_COL_BLOCK;
  float* stage = any_f16<P, G> ? stage_buffer(1, 2 * w) : nullptr;
  // Sum in chunks of rows, then fold (NOTE: [chunked sums]).
  for (int64_t rc = tile.r0; rc < tile.r1; rc += kSumChunk) {
    const int64_t rc1 = std::min<int64_t>(tile.r1, rc + kSumChunk);
    std::fill(col_chunk, col_chunk + w, 0.0f);
    if (t.fold) {
      std::fill(fold_chunk, fold_chunk + w, 0.0f);
    }
    float p2_chunk = 0.0f;
    for (int64_t r = rc; r < rc1; ++r) {
      const int64_t base = (mat + r) * geo.cols + tile.c0;
      const auto* p = staged(x.param + base, w, stage);
      const auto* g = staged(x.grad + base, w, stage + w);
      const int64_t col_w = AF_FAULT(Fault::DropLastColumn) ? w - 1 : w;
      // Sum the row in chunks of columns (NOTE: [chunked sums]).
      float rs = 0.0f;
      float ps = 0.0f;
      if (w <= kSumChunk) {
        sum_row(p, g, h, 0, w, col_w, col_chunk, rs, ps);
      } else {
        for (int64_t cc = 0; cc < w; cc += kSumChunk) {
          const int64_t cc1 = std::min<int64_t>(w, cc + kSumChunk);
          float rs_chunk = 0.0f;
          float ps_chunk = 0.0f;
          sum_row(p, g, h, cc, cc1, col_w, col_chunk, rs_chunk, ps_chunk);
          rs += rs_chunk;
          ps += ps_chunk;
        }
      }
      row_part[(mat + r) * t.tiles.n_col_blocks + it.col_block] = rs;
      p2_chunk += ps;
      if (t.fold) {
        // The new row EMA as finish_pass1 forms it (rs is the row's only
        // partial).
        const float row = new_row(x, t, mat + r, rs, s);
        sums.fold_ok = sums.fold_ok && row >= kFoldMinRow && row < INFINITY;
        const float inv_row = 1.0f / row;
#pragma omp simd
        for (int64_t c = 0; c < w; ++c) {
          const float gv = load(g, c);
          fold_chunk[c] += (gv * gv) * inv_row;
        }
      }
    }
#pragma omp simd
    for (int64_t c = 0; c < w; ++c) {
      col[c] += col_chunk[c];
    }
    if (t.fold) {
#pragma omp simd
      for (int64_t c = 0; c < w; ++c) {
        fold[c] += fold_chunk[c];
      }
    }
    sums.p2 += p2_chunk;
  }
  return sums;
}

// Pass 1 of a flat range: the second-moment EMA, sum(p^2) and sum(u^2).
template <typename P, typename G>
AF_SIMD_CLONES ItemSums pass1_flat(
    const TensorData<P, G>& x,
    const TensorPlan& t,
    const Item& it,
    const AdafactorHyper h,
    const AdafactorStepScalars s) {
  int64_t lo, hi;
  flat_range(t.geo.n, it, lo, hi);
  const bool no_eps = AF_FAULT(Fault::FlatWithoutEps1);
  float* stage = any_f16<P, G> ? stage_buffer(1, 2 * kSumChunk) : nullptr;
  ItemSums sums;
  for (int64_t ec = lo; ec < hi; ec += kSumChunk) {
    const int64_t ec1 = std::min<int64_t>(hi, ec + kSumChunk);
    const int64_t n = ec1 - ec;
    // Local pointers: through `x` GCC does not vectorize this loop.
    const auto* p = staged(x.param + ec, n, stage);
    const auto* g = staged(x.grad + ec, n, stage + kSumChunk);
    const float* sq_in = x.sq + ec;
    float* sq_out = x.sq_out + ec;
    float p2_chunk = 0.0f;
    float u2_chunk = 0.0f;
#pragma omp simd reduction(+ : p2_chunk, u2_chunk)
    for (int64_t e = 0; e < n; ++e) {
      const float pv = load(p, e);
      p2_chunk += pv * pv;
      const float gv = load(g, e);
      const float sg = no_eps ? gv * gv : adafactor_sq_grad(gv, h);
      const float sq = adafactor_ema(sq_in[e], sg, s);
      sq_out[e] = sq;
      const float u = adafactor_flat_update(sq, gv);
      u2_chunk += u * u;
    }
    sums.p2 += p2_chunk;
    sums.u2 += u2_chunk;
  }
  return sums;
}

// Pass 2 of a factored tile: sum(u^2) of the unclipped update.
template <typename P, typename G>
AF_SIMD_CLONES float pass2_factored(
    const TensorData<P, G>& x,
    const TensorPlan& t,
    const Item& it,
    const float* scratch) {
  const Geometry& geo = t.geo;
  const TileRange tile = tile_range(t.tiles, geo.rows, geo.cols, it);
  const int64_t w = tile.c1 - tile.c0;
  const int64_t mat = static_cast<int64_t>(it.matrix) * geo.rows;
  const float* col_fac =
      scratch + t.scratch.col_fac + it.matrix * geo.cols + tile.c0;
  const float* row_fac = scratch + t.scratch.row_fac;
  float* stage = any_f16<G> ? stage_buffer(1, w) : nullptr;
  float u2 = 0.0f;
  for (int64_t rc = tile.r0; rc < tile.r1; rc += kSumChunk) {
    const int64_t rc1 = std::min<int64_t>(tile.r1, rc + kSumChunk);
    float u2_chunk = 0.0f;
    for (int64_t r = rc; r < rc1; ++r) {
      const float rf = row_fac[mat + r];
      const auto* g =
          staged(x.grad + (mat + r) * geo.cols + tile.c0, w, stage);
      float acc = 0.0f;
      for (int64_t cc = 0; cc < w; cc += kSumChunk) {
        const int64_t cc1 = std::min<int64_t>(w, cc + kSumChunk);
        float acc_chunk = 0.0f;
#pragma omp simd reduction(+ : acc_chunk)
        for (int64_t c = cc; c < cc1; ++c) {
          const float u =
              adafactor_factored_update(rf, col_fac[c], load(g, c));
          acc_chunk += u * u;
        }
        acc += acc_chunk;
      }
      u2_chunk += acc;
    }
    u2 += u2_chunk;
  }
  return u2;
}

// `v` as the storage type P will round it: stochastically with the random
// `bits` (NOTE: [stochastic rounding]) when Stochastic and P is 16-bit.
template <bool Stochastic, typename P>
inline float rounded(float v, AF_UINT bits) {
  if constexpr (Stochastic && std::is_same_v<P, bf16>) {
    return round_bf16_stochastic(v, bits);
  } else if constexpr (Stochastic && std::is_same_v<P, f16>) {
    return round_f16_stochastic(v, bits);
  } else {
    return v;
  }
}

// The random bits of the elements of a block [base, base + w) that does
// not cross a multiple of 2^32: the high word of the index is constant, and
// the loops count the low word in 32-bit lanes (`first`, then +1).
struct BlockBits {
  AF_UINT first;
  AF_UINT hi;
  explicit BlockBits(int64_t base)
      : first(static_cast<AF_UINT>(base)),
        hi(static_cast<AF_UINT>(base >> 32)) {}
  AF_UINT operator()(AF_UINT key, AF_UINT lo) const {
    return adafactor_random_bits(key, lo, hi);
  }
};

// Apply the clipped update to `w` elements at `base`; `u_of(c, g)` forms
// the unclipped update of element c from its gradient g. The options
// adafactor_apply tests are template arguments, so its branches fold away
// and the loops vectorize.
template <
    bool Momentum,
    bool Decay,
    bool Stochastic,
    typename P,
    typename G,
    typename U>
inline void apply_block(
    const TensorData<P, G>& x,
    const TensorPlan& t,
    AdafactorHyper h,
    int64_t base,
    int64_t w,
    U u_of) {
  h.flags = (Momentum ? AF_MOMENTUM : 0) | (Decay ? AF_WEIGHT_DECAY : 0);
  const AdafactorTensorScalars ts = t.ts;
  const AF_UINT param_key = t.param_key;
  const AF_UINT exp_avg_key = t.exp_avg_key;
  const BlockBits element_bits(base);
  // NOTE: [float16 blocks]: p, g, exp_avg in; p, exp_avg out.
  float* stage =
      any_16bit<P, G> ? stage_buffer(0, 5 * kStageBlock) : nullptr;
  const auto* p = staged<true>(x.param + base, w, stage);
  const auto* g = staged<true>(x.grad + base, w, stage + kStageBlock);
  auto* p_out =
      staging_out<true>(x.param_out + base, stage + 2 * kStageBlock);
  if constexpr (Momentum) {
    const auto* m =
        staged<true>(x.exp_avg + base, w, stage + 3 * kStageBlock);
    auto* m_out =
        staging_out<true>(x.exp_avg_out + base, stage + 4 * kStageBlock);
    AF_UINT lo = element_bits.first;
#pragma omp simd linear(lo : 1)
    for (int64_t c = 0; c < w; ++c) {
      float mv = load(m, c);
      const float pv =
          adafactor_apply(load(p, c), u_of(c, load(g, c)), mv, ts, h);
      store(m_out, c,
            rounded<Stochastic, P>(mv, element_bits(exp_avg_key, lo)));
      store(p_out, c,
            rounded<Stochastic, P>(pv, element_bits(param_key, lo)));
      ++lo;
    }
    store_halves<true>(x.exp_avg_out + base, m_out, w);
  } else if (AF_FAULT(Fault::UpdateRoundedEarly)) {
    // The update rounded to the storage type before the subtraction.
    for (int64_t c = 0; c < w; ++c) {
      float mv = 0.0f;
      const float pv = load(p, c);
      P update[1];
      store(update, 0,
            pv - adafactor_apply(pv, u_of(c, load(g, c)), mv, ts, h));
      store(p_out, c, pv - load(update, 0));
    }
  } else {
    AF_UINT lo = element_bits.first;
#pragma omp simd linear(lo : 1)
    for (int64_t c = 0; c < w; ++c) {
      float mv = 0.0f;
      const float pv =
          adafactor_apply(load(p, c), u_of(c, load(g, c)), mv, ts, h);
      store(p_out, c,
            rounded<Stochastic, P>(pv, element_bits(param_key, lo)));
      ++lo;
    }
  }
  store_halves<true>(x.param_out + base, p_out, w);
}

// apply_block over `w` elements, kStageBlock at a time when float16 data
// is staged (NOTE: [float16 blocks]), and split where the element index
// crosses a multiple of 2^32 (BlockBits).
template <
    bool Momentum,
    bool Decay,
    bool Stochastic,
    typename P,
    typename G,
    typename U>
inline void apply_range(
    const TensorData<P, G>& x,
    const TensorPlan& t,
    const AdafactorHyper h,
    int64_t base,
    int64_t w,
    U u_of) {
  constexpr int64_t kWord = int64_t(1) << 32;
  const int64_t block = any_16bit<P, G> ? kStageBlock : w;
  for (int64_t c0 = 0; c0 < w;) {
    const int64_t next_word = ((base + c0) / kWord + 1) * kWord;
    const int64_t n = std::min({block, w - c0, next_word - (base + c0)});
    apply_block<Momentum, Decay, Stochastic>(
        x, t, h, base + c0, n,
        [=](int64_t c, float gv) { return u_of(c0 + c, gv); });
    c0 += n;
  }
}

// Pass 3 of one item: clip, scale and apply the update.
template <bool Momentum, bool Decay, bool Stochastic, typename P, typename G>
AF_SIMD_CLONES void pass3(
    const TensorData<P, G>& x,
    const TensorPlan& t,
    const Item& it,
    const AdafactorHyper h,
    const float* scratch) {
  const Geometry& geo = t.geo;
  if (!geo.factored) {
    int64_t lo, hi;
    flat_range(geo.n, it, lo, hi);
    const float* sq = x.sq_out + lo;
    apply_range<Momentum, Decay, Stochastic>(
        x, t, h, lo, hi - lo, [=](int64_t c, float gv) {
          return adafactor_flat_update(sq[c], gv);
        });
    return;
  }
  const TileRange tile = tile_range(t.tiles, geo.rows, geo.cols, it);
  const int64_t mat = static_cast<int64_t>(it.matrix) * geo.rows;
  const float* col_fac =
      scratch + t.scratch.col_fac + it.matrix * geo.cols + tile.c0;
  const float* row_fac = scratch + t.scratch.row_fac;
  for (int64_t r = tile.r0; r < tile.r1; ++r) {
    const float rf = row_fac[mat + r];
    const int64_t base = (mat + r) * geo.cols + tile.c0;
    apply_range<Momentum, Decay, Stochastic>(
        x, t, h, base, tile.c1 - tile.c0, [=](int64_t c, float gv) {
          return adafactor_factored_update(rf, col_fac[c], gv);
        });
  }
}

} // namespace mlx_fused_adafactor::cpu
