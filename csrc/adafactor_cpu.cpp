// The CPU path of the fused Adafactor step.
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
// runs pass 2 as before, so special values behave exactly as in stock.
//
// NOTE: [tiles]
// Every pass runs over work items that depend only on the shapes: a factored
// matrix is cut into tiles of at most AF_CPU_COL_BLOCK columns and a bounded
// number of row blocks, a flat tensor into ranges of AF_CPU_TILE elements.
// Each item writes its own partial sums and the partials are combined in
// item order, so results are bitwise identical from run to run and do not
// depend on the number of threads.
//
// NOTE: [column partials]
// Column sums of a tile go to a (row block, column) scratch row owned by that
// tile; at most AF_CPU_MAX_ROW_BLOCKS row blocks per matrix, and at least
// AF_CPU_TILE / AF_CPU_COL_BLOCK rows per block otherwise, keep the scratch
// at most 1/16 of the tensor.

#include <algorithm>
#include <cmath>
#include <cstring>

#include "mlx/backend/common/utils.h"
#include "mlx/backend/cpu/encoder.h"

#include "adafactor.h"
#include "buffer_cache.h"
#include "cpu_types.h"
#include "parallel.h"

namespace mlx_fused_adafactor {

namespace {

template <typename T>
inline float load(const T* x, int64_t i) {
  return to_float(x[i]);
}

template <typename T>
inline void store(T* x, int64_t i, float v) {
  x[i] = from_float<T>(v);
}

// Pointers and geometry of one tensor of the step.
template <typename P, typename G>
struct Tensor {
  const P* p;
  const G* g;
  P* p_out;
  const float* s0; // exp_avg_sq_row, or exp_avg_sq
  const float* s1; // exp_avg_sq_col
  float* s0_out;
  float* s1_out;
  const P* m; // exp_avg (momentum only)
  P* m_out;

  bool factored;
  bool fold; // NOTE: [folded update sum] applies (tiles span whole rows)
  bool needs_pass2; // sum(u^2) still to be taken by pass 2
  int64_t n;
  float inv_n;
  float inv_c; // (float)(1.0 / C), for the row means
  // Factored geometry: B matrices of R x C, tiled as in NOTE: [tiles].
  int64_t B, R, C;
  int64_t cb, ncb, rb, nrb;
  // Offsets into the scratch buffer; fold_part holds the T_j partials.
  size_t row_part, col_part, row_fac, col_fac, fold_part;
  // Range of this tensor's work items.
  size_t item_begin, item_end;

  AdafactorTensorScalars ts;
};

// NOTE: [simd clones]
// The passes are built twice on x86-64, for the baseline (SSE2) and for AVX2,
// and the loader picks the clone the machine supports. AVX2 doubles the
// lanes of the float16/bfloat16 conversions, which otherwise keep the
// low-precision step short of memory bandwidth (GPT-2 small in bfloat16:
// 138 ms per step with SSE2, 89 ms with AVX2 on the reference machine).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define AF_SIMD_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define AF_SIMD_CLONES
#endif

// NOTE: [chunked sums]
// A float32 running sum over n terms loses about sqrt(n) ulps; a tile of a
// tall matrix (N, 1) holds 65536 rows, which made its column sums and sum(p^2)
// as inexact as MLX's own reductions (~2e-5 relative). Sums therefore run in
// chunks of kSumChunk rows (or elements), and the chunk sums are folded into
// the tile's sum. The order is still fixed by the shapes alone.
constexpr int64_t kSumChunk = 256;

// NOTE: [folded update sum]: the smallest row EMA the fold takes.
constexpr float kFoldMinRow = 1e-32f;

// Per-thread sums of one chunk of rows: column sums of g^2 + eps1, then the
// T_j of NOTE: [folded update sum]. On the heap: 128 KiB is too much for
// some thread stacks (512 KiB on macOS).
float* chunk_buffer() {
  thread_local std::vector<float> buffer(2 * AF_CPU_COL_BLOCK);
  return buffer.data();
}

struct Item {
  uint32_t tensor;
  uint32_t b; // matrix within the tensor (factored)
  uint32_t i; // row block (factored) or element range (flat)
  uint32_t j; // column block (factored)
};

// The data of an input, or of a contiguous copy when it arrived with other
// strides: the copy is made by a gather run once the input is ready.
const void* contiguous_data(
    const mx::array& a,
    std::vector<std::vector<char>>& staged,
    std::vector<std::function<void()>>& gathers) {
  if (a.flags().row_contiguous || a.size() == 0) {
    return a.data<char>();
  }
  auto& buf = staged.emplace_back(a.nbytes());
  char* dst = buf.data();
  gathers.push_back([dst,
                     src = a.data<char>(),
                     size = a.size(),
                     item = a.itemsize(),
                     shape = a.shape(),
                     strides = a.strides()]() {
    for (size_t e = 0; e < size; ++e) {
      auto loc = mx::elem_to_loc(static_cast<int64_t>(e), shape, strides);
      std::memcpy(dst + e * item, src + loc * item, item);
    }
  });
  return dst;
}

// Give `out` a buffer: the input's own when MLX says it can be donated,
// otherwise one from the step's buffer cache (NOTE: [eager step] explains why
// fresh memory is expensive). Returns the bytes taken from the cache.
size_t alloc_output(const mx::array& in, mx::array& out) {
  if (in.is_donatable() && in.flags().row_contiguous &&
      in.itemsize() == out.itemsize() && in.data_size() == in.size() &&
      in.size() == out.size()) {
    out.copy_shared_buffer(in);
    return 0;
  }
  out.set_data(BufferCache::instance().acquire(out.nbytes()));
  return out.nbytes();
}

template <typename P, typename G>
class CpuStep {
 public:
  CpuStep(AdafactorHyper h) : h_(h) {}

  std::vector<Tensor<P, G>> tensors;
  std::vector<Item> items;
  std::vector<float> scratch;
  std::vector<float> sum_p2; // per item
  std::vector<float> sum_u2; // per item
  std::vector<uint8_t> fold_ok; // per item: its rows allow the fold

  // Lay out tiles and scratch for all tensors (NOTE: [tiles]).
  void plan() {
    size_t off = 0;
    for (uint32_t t = 0; t < tensors.size(); ++t) {
      auto& x = tensors[t];
      x.item_begin = items.size();
      if (x.factored) {
        x.cb = std::max<int64_t>(1, std::min<int64_t>(x.C, AF_CPU_COL_BLOCK));
        x.ncb = (x.C + x.cb - 1) / x.cb;
        x.rb = std::max<int64_t>(1, AF_CPU_TILE / x.cb);
        x.nrb = (x.R + x.rb - 1) / x.rb;
        if (x.nrb > AF_CPU_MAX_ROW_BLOCKS) {
          x.rb = (x.R + AF_CPU_MAX_ROW_BLOCKS - 1) / AF_CPU_MAX_ROW_BLOCKS;
          x.nrb = (x.R + x.rb - 1) / x.rb;
        }
        x.row_part = off;
        off += x.B * x.R * x.ncb;
        x.col_part = off;
        off += x.B * x.nrb * x.C;
        x.row_fac = off;
        off += x.B * x.R;
        x.col_fac = off;
        off += x.B * x.C;
        x.fold = x.ncb == 1;
        x.needs_pass2 = true;
        x.fold_part = off;
        if (x.fold) {
          off += x.B * x.nrb * x.C;
        }
        if (x.n > 0) {
          for (uint32_t b = 0; b < x.B; ++b) {
            for (uint32_t i = 0; i < x.nrb; ++i) {
              for (uint32_t j = 0; j < x.ncb; ++j) {
                items.push_back({t, b, i, j});
              }
            }
          }
        }
      } else {
        int64_t chunks = (x.n + AF_CPU_TILE - 1) / AF_CPU_TILE;
        for (uint32_t i = 0; i < chunks; ++i) {
          items.push_back({t, 0, i, 0});
        }
      }
      x.item_end = items.size();
    }
    scratch.resize(off);
    sum_p2.assign(items.size(), 0.0f);
    sum_u2.assign(items.size(), 0.0f);
    fold_ok.assign(items.size(), 0);
  }

  void run(float t, float lr) {
    auto& pool = ThreadPool::instance();
    s_ = adafactor_step_scalars(t, lr, h_);
    size_t total = 0;
    for (auto& x : tensors) {
      total += x.n;
    }
    // Waking the pool costs more than a tiny step.
    bool serial = total < AF_CPU_TILE;

    pool.parallel_for(items.size(), [&](size_t k) { pass1(k); }, serial);
    pool.parallel_for(
        tensors.size(), [&](size_t t) { finish_pass1(t); }, serial);
    if (any_needs_pass2()) {
      pool.parallel_for(items.size(), [&](size_t k) { pass2(k); }, serial);
      pool.parallel_for(
          tensors.size(), [&](size_t t) { finish_pass2(t); }, serial);
    }
    pool.parallel_for(items.size(), [&](size_t k) { pass3(k); }, serial);
  }

 private:
  AdafactorHyper h_;
  AdafactorStepScalars s_;

  bool any_needs_pass2() const {
    for (auto& x : tensors) {
      if (x.factored && x.needs_pass2) {
        return true;
      }
    }
    return false;
  }

  // Element range of a flat item.
  static void flat_range(const Tensor<P, G>& x, const Item& it, int64_t& lo,
                         int64_t& hi) {
    lo = static_cast<int64_t>(it.i) * AF_CPU_TILE;
    hi = std::min<int64_t>(x.n, lo + AF_CPU_TILE);
  }

  // Row and column range of a factored tile.
  static void tile_range(const Tensor<P, G>& x, const Item& it, int64_t& r0,
                         int64_t& r1, int64_t& c0, int64_t& c1) {
    r0 = it.i * x.rb;
    r1 = std::min<int64_t>(x.R, r0 + x.rb);
    c0 = it.j * x.cb;
    c1 = std::min<int64_t>(x.C, c0 + x.cb);
  }

  AF_SIMD_CLONES void pass1(size_t k) {
    const Item& it = items[k];
    auto& x = tensors[it.tensor];
    const AdafactorHyper h = h_;
    float pp = 0.0f;
    if (x.factored) {
      int64_t r0, r1, c0, c1;
      tile_range(x, it, r0, r1, c0, c1);
      const int64_t w = c1 - c0;
      const size_t part = (it.b * x.nrb + it.i) * x.C + c0;
      float* col = scratch.data() + x.col_part + part;
      float* fold = scratch.data() + x.fold_part + part;
      std::fill(col, col + w, 0.0f);
      if (x.fold) {
        std::fill(fold, fold + w, 0.0f);
      }
      bool fold_rows_ok = true;
      // Sum in chunks of rows, then fold (NOTE: [chunked sums]).
      float* col_chunk = chunk_buffer();
      float* fold_chunk = col_chunk + AF_CPU_COL_BLOCK;
      for (int64_t rc = r0; rc < r1; rc += kSumChunk) {
        const int64_t rc1 = std::min<int64_t>(r1, rc + kSumChunk);
        std::fill(col_chunk, col_chunk + w, 0.0f);
        if (x.fold) {
          std::fill(fold_chunk, fold_chunk + w, 0.0f);
        }
        float pp_chunk = 0.0f;
        for (int64_t r = rc; r < rc1; ++r) {
          const int64_t base = (it.b * x.R + r) * x.C + c0;
          const P* p = x.p + base;
          const G* g = x.g + base;
          float rs = 0.0f;
          float ps = 0.0f;
#pragma omp simd reduction(+ : rs, ps)
          for (int64_t c = 0; c < w; ++c) {
            float s = adafactor_sq_grad(load(g, c), h);
            rs += s;
            col_chunk[c] += s;
            float pv = load(p, c);
            ps += pv * pv;
          }
          scratch[x.row_part + (it.b * x.R + r) * x.ncb + it.j] = rs;
          pp_chunk += ps;
          if (x.fold) {
            // The new row EMA as finish_pass1 forms it (rs is the row's
            // only partial).
            const float row = new_row(x, it.b * x.R + r, rs);
            fold_rows_ok = fold_rows_ok && row >= kFoldMinRow && row < INFINITY;
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
        if (x.fold) {
#pragma omp simd
          for (int64_t c = 0; c < w; ++c) {
            fold[c] += fold_chunk[c];
          }
        }
        pp += pp_chunk;
      }
      fold_ok[k] = fold_rows_ok;
    } else {
      int64_t lo, hi;
      flat_range(x, it, lo, hi);
      const AdafactorStepScalars s = s_;
      // Local pointers: through `x` GCC does not vectorize this loop (it was
      // scalar until this was spelled out).
      const P* p = x.p;
      const G* g = x.g;
      const float* sq_in = x.s0;
      float* sq_out = x.s0_out;
      float us = 0.0f;
      for (int64_t ec = lo; ec < hi; ec += kSumChunk) {
        const int64_t ec1 = std::min<int64_t>(hi, ec + kSumChunk);
        float pp_chunk = 0.0f;
        float us_chunk = 0.0f;
#pragma omp simd reduction(+ : pp_chunk, us_chunk)
        for (int64_t e = ec; e < ec1; ++e) {
          float pv = load(p, e);
          pp_chunk += pv * pv;
          float gv = load(g, e);
          float sq = adafactor_ema(sq_in[e], adafactor_sq_grad(gv, h), s);
          sq_out[e] = sq;
          float u = adafactor_flat_update(sq, gv);
          us_chunk += u * u;
        }
        pp += pp_chunk;
        us += us_chunk;
      }
      sum_u2[k] = us;
    }
    sum_p2[k] = pp;
  }

  // The new row EMA of row `rr` from the sum of its g^2 + eps1.
  float new_row(const Tensor<P, G>& x, int64_t rr, float row_sum) const {
    return adafactor_ema(x.s0[rr], row_sum * x.inv_c, s_);
  }

  static void add_row(float* acc, const float* row, int64_t n) {
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) {
      acc[c] += row[c];
    }
  }

  float item_sum(const std::vector<float>& v, const Tensor<P, G>& x) const {
    float acc = 0.0f;
    for (size_t k = x.item_begin; k < x.item_end; ++k) {
      acc += v[k];
    }
    return acc;
  }

  void finish_pass1(size_t t) {
    auto& x = tensors[t];
    x.ts.lr = adafactor_tensor_lr(item_sum(sum_p2, x), x.inv_n, s_, h_);
    if (!x.factored) {
      x.ts.clip_scale = adafactor_clip_scale(item_sum(sum_u2, x), x.inv_n, h_);
      return;
    }
    const float inv_r = static_cast<float>(1.0 / static_cast<double>(x.R));
    float* row_part = scratch.data() + x.row_part;
    float* col_part = scratch.data() + x.col_part;
    float* row_fac = scratch.data() + x.row_fac;
    float* col_fac = scratch.data() + x.col_fac;
    float* fold_part = scratch.data() + x.fold_part;
    bool fold = x.fold;
    for (size_t k = x.item_begin; fold && k < x.item_end; ++k) {
      fold = fold_ok[k];
    }
    double sum_u2_folded = 0.0;
    for (int64_t b = 0; b < x.B; ++b) {
      // Row EMA, then the factors relative to the mean of the new rows.
      float row_total = 0.0f;
      for (int64_t r = 0; r < x.R; ++r) {
        const int64_t rr = b * x.R + r;
        float s = 0.0f;
        for (int64_t j = 0; j < x.ncb; ++j) {
          s += row_part[rr * x.ncb + j];
        }
        float v = new_row(x, rr, s);
        x.s0_out[rr] = v;
        row_total += v;
      }
      const float row_mean = row_total * inv_r;
      for (int64_t r = 0; r < x.R; ++r) {
        const int64_t rr = b * x.R + r;
        row_fac[rr] = adafactor_row_factor(x.s0_out[rr], row_mean);
      }
      // Column EMA from the row-block partials, in row-block order; the
      // partials are summed into row block 0's, a vectorizable row at a time.
      float* col_sum = col_part + b * x.nrb * x.C;
      float* fold_sum = fold_part + b * x.nrb * x.C;
      for (int64_t i = 1; i < x.nrb; ++i) {
        add_row(col_sum, col_sum + i * x.C, x.C);
        if (fold) {
          add_row(fold_sum, fold_sum + i * x.C, x.C);
        }
      }
      for (int64_t c = 0; c < x.C; ++c) {
        const int64_t cc = b * x.C + c;
        float v = adafactor_ema(x.s1[cc], col_sum[c] * inv_r, s_);
        x.s1_out[cc] = v;
        col_fac[cc] = adafactor_col_factor(v);
      }
      // NOTE: [folded update sum]
      if (fold) {
        double acc = 0.0;
        for (int64_t c = 0; c < x.C; ++c) {
          const float cf = col_fac[b * x.C + c];
          acc += static_cast<double>(fold_sum[c]) * (cf * cf);
        }
        sum_u2_folded += static_cast<double>(row_mean) * acc;
      }
    }
    const float sum_u2_total = static_cast<float>(sum_u2_folded);
    x.needs_pass2 = !(fold && std::isfinite(sum_u2_total));
    if (!x.needs_pass2) {
      x.ts.clip_scale = adafactor_clip_scale(sum_u2_total, x.inv_n, h_);
    }
  }

  AF_SIMD_CLONES void pass2(size_t k) {
    const Item& it = items[k];
    auto& x = tensors[it.tensor];
    if (!x.factored || !x.needs_pass2) {
      return;
    }
    int64_t r0, r1, c0, c1;
    tile_range(x, it, r0, r1, c0, c1);
    const int64_t w = c1 - c0;
    const float* col_fac = scratch.data() + x.col_fac + it.b * x.C + c0;
    float us = 0.0f;
    for (int64_t rc = r0; rc < r1; rc += kSumChunk) {
      const int64_t rc1 = std::min<int64_t>(r1, rc + kSumChunk);
      float us_chunk = 0.0f;
      for (int64_t r = rc; r < rc1; ++r) {
        const float rf = scratch[x.row_fac + it.b * x.R + r];
        const G* g = x.g + (it.b * x.R + r) * x.C + c0;
        float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
        for (int64_t c = 0; c < w; ++c) {
          float u = adafactor_factored_update(rf, col_fac[c], load(g, c));
          acc += u * u;
        }
        us_chunk += acc;
      }
      us += us_chunk;
    }
    sum_u2[k] = us;
  }

  void finish_pass2(size_t t) {
    auto& x = tensors[t];
    if (x.factored && x.needs_pass2) {
      x.ts.clip_scale = adafactor_clip_scale(item_sum(sum_u2, x), x.inv_n, h_);
    }
  }

  // Apply the clipped update to `w` elements at `base`; `u_of(c)` forms the
  // unclipped update of element c.
  template <bool Momentum, typename U>
  void apply(const Tensor<P, G>& x, int64_t base, int64_t w, U u_of) {
    const AdafactorHyper h = h_;
    const AdafactorTensorScalars ts = x.ts;
    const P* p = x.p + base;
    P* p_out = x.p_out + base;
    if constexpr (Momentum) {
      const P* m = x.m + base;
      P* m_out = x.m_out + base;
#pragma omp simd
      for (int64_t c = 0; c < w; ++c) {
        float mv = load(m, c);
        float pv = adafactor_apply(load(p, c), u_of(c), mv, ts, h);
        store(m_out, c, mv);
        store(p_out, c, pv);
      }
    } else {
#pragma omp simd
      for (int64_t c = 0; c < w; ++c) {
        float mv = 0.0f;
        store(p_out, c, adafactor_apply(load(p, c), u_of(c), mv, ts, h));
      }
    }
  }

  template <bool Momentum>
  void pass3_impl(const Item& it, const Tensor<P, G>& x) {
    if (x.factored) {
      int64_t r0, r1, c0, c1;
      tile_range(x, it, r0, r1, c0, c1);
      const float* col_fac = scratch.data() + x.col_fac + it.b * x.C + c0;
      for (int64_t r = r0; r < r1; ++r) {
        const float rf = scratch[x.row_fac + it.b * x.R + r];
        const int64_t base = (it.b * x.R + r) * x.C + c0;
        const G* g = x.g + base;
        apply<Momentum>(x, base, c1 - c0, [=](int64_t c) {
          return adafactor_factored_update(rf, col_fac[c], load(g, c));
        });
      }
    } else {
      int64_t lo, hi;
      flat_range(x, it, lo, hi);
      const G* g = x.g + lo;
      const float* sq = x.s0_out + lo;
      apply<Momentum>(x, lo, hi - lo, [=](int64_t c) {
        return adafactor_flat_update(sq[c], load(g, c));
      });
    }
  }

  AF_SIMD_CLONES void pass3(size_t k) {
    const Item& it = items[k];
    const auto& x = tensors[it.tensor];
    if (h_.flags & AF_MOMENTUM) {
      pass3_impl<true>(it, x);
    } else {
      pass3_impl<false>(it, x);
    }
  }
};

// The CPU step for one dtype pair, ready to run once its inputs are ready.
template <typename P, typename G>
class CpuRunner : public StepRunner {
 public:
  CpuRunner(
      const AdafactorHyper& h,
      const std::vector<mx::array>& inputs,
      std::vector<mx::array>& outputs)
      : step_(h) {
    const bool momentum = h.flags & AF_MOMENTUM;
    staged_.reserve(inputs.size());
    size_t in = kFirstTensorIdx, out = 0;
    while (in < inputs.size()) {
      const auto& p = inputs[in + kParamIdx];
      const bool factored = is_factored(p);
      Tensor<P, G> x{};
      auto ptr = [&](int slot) {
        return contiguous_data(inputs[in + slot], staged_, gathers_);
      };
      x.p = static_cast<const P*>(ptr(kParamIdx));
      x.g = static_cast<const G*>(ptr(kGradIdx));
      x.p_out = outputs[out].data<P>();
      x.factored = factored;
      x.n = p.size();
      x.inv_n = static_cast<float>(1.0 / static_cast<double>(x.n));
      if (factored) {
        x.s0 = static_cast<const float*>(ptr(kRowIdx));
        x.s1 = static_cast<const float*>(ptr(kColIdx));
        x.s0_out = outputs[out + 1].data<float>();
        x.s1_out = outputs[out + 2].data<float>();
        x.C = p.shape(-1);
        x.R = p.shape(-2);
        x.inv_c = static_cast<float>(1.0 / static_cast<double>(x.C));
        x.B = 1;
        for (int d = 0; d < p.ndim() - 2; ++d) {
          x.B *= p.shape(d);
        }
      } else {
        x.s0 = static_cast<const float*>(ptr(kSqIdx));
        x.s0_out = outputs[out + 1].data<float>();
      }
      if (momentum) {
        x.m = static_cast<const P*>(ptr(num_inputs(factored, momentum) - 1));
        x.m_out = outputs[out + num_outputs(factored, momentum) - 1].data<P>();
      }
      step_.tensors.push_back(x);
      in += num_inputs(factored, momentum);
      out += num_outputs(factored, momentum);
    }
    step_.plan();
  }

  void execute(float t, float lr) override {
    for (auto& gather : gathers_) {
      gather();
    }
    step_.run(t, lr);
  }

 private:
  CpuStep<P, G> step_;
  std::vector<std::vector<char>> staged_;
  std::vector<std::function<void()>> gathers_;
};

template <typename P>
std::shared_ptr<StepRunner> make_runner_p(
    const AdafactorHyper& h,
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs) {
  switch (inputs[kFirstTensorIdx + kGradIdx].dtype()) {
    case mx::float32:
      return std::make_shared<CpuRunner<P, float>>(h, inputs, outputs);
    case mx::float16:
      return std::make_shared<CpuRunner<P, f16>>(h, inputs, outputs);
    case mx::bfloat16:
      return std::make_shared<CpuRunner<P, bf16>>(h, inputs, outputs);
    default:
      throw std::invalid_argument("[adafactor] unsupported gradient dtype.");
  }
}

} // namespace

std::shared_ptr<StepRunner> make_cpu_runner(
    const AdafactorHyper& h,
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs) {
  switch (inputs[kFirstTensorIdx + kParamIdx].dtype()) {
    case mx::float32:
      return make_runner_p<float>(h, inputs, outputs);
    case mx::float16:
      return make_runner_p<f16>(h, inputs, outputs);
    case mx::bfloat16:
      return make_runner_p<bf16>(h, inputs, outputs);
    default:
      throw std::invalid_argument("[adafactor] unsupported parameter dtype.");
  }
}

void AdafactorStep::eval_cpu(
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs) {
  if (inputs.size() <= kFirstTensorIdx) {
    return;
  }
  // Outputs first: donation must be decided before anything else holds the
  // inputs.
  const bool momentum = hyper_.flags & AF_MOMENTUM;
  size_t in = kFirstTensorIdx, out = 0, cached = 0;
  while (in < inputs.size()) {
    const bool factored = is_factored(inputs[in]);
    cached += alloc_output(inputs[in + kParamIdx], outputs[out]);
    for (int k = 1; k < num_outputs(factored, momentum); ++k) {
      cached += alloc_output(inputs[in + 1 + k], outputs[out + k]);
    }
    in += num_inputs(factored, momentum);
    out += num_outputs(factored, momentum);
  }
  BufferCache::instance().reserve(cached);

  auto runner = make_cpu_runner(hyper_, inputs, outputs);
  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (auto& a : inputs) {
    encoder.set_input_array(a);
  }
  for (auto& a : outputs) {
    encoder.set_output_array(a);
  }
  encoder.dispatch([runner,
                    t_ptr = inputs[kStepIdx].data<float>(),
                    lr_ptr = inputs[kLrIdx].data<float>()]() {
    runner->execute(*t_ptr, *lr_ptr);
  });
}

} // namespace mlx_fused_adafactor
