// The CPU step for one (parameter, gradient) dtype pair: the passes of
// cpu/passes.h over every work item, spread over the thread pool, and the
// O(rows + cols) work between them.

#pragma once

#include <cmath>
#include <type_traits>
#include <vector>

#include "adafactor_math.h"
#include "cpu/faults.h"
#include "cpu/passes.h"
#include "cpu/tensor.h"
#include "cpu/thread_pool.h"

namespace mlx_fused_adafactor::cpu {

template <typename P, typename G>
class CpuStep {
 public:
  // `n`: the number of tensors that will be added.
  CpuStep(const AdafactorHyper& h, size_t n) : h_(h) {
    data_.reserve(n);
    plans_.reserve(n);
    items_.reserve(n);
  }

  // Add a tensor; call plan() once all are added.
  void add(const TensorData<P, G>& data, const Geometry& geo, AF_UINT key) {
    TensorPlan t;
    t.geo = geo;
    t.key = key;
    t.tiles = make_tiling(geo);
    // NOTE: [folded update sum]: tiles must span whole rows.
    t.fold = geo.factored && t.tiles.n_col_blocks == 1;
    data_.push_back(data);
    plans_.push_back(t);
  }

  // Lay out work items and scratch (NOTE: [tiles]).
  void plan() {
    size_t scratch_size = 0;
    for (uint32_t i = 0; i < plans_.size(); ++i) {
      auto& t = plans_[i];
      t.item_begin = items_.size();
      t.scratch = plan_tensor(i, t.geo, t.tiles, t.fold, items_, scratch_size);
      t.item_end = items_.size();
      // A matrix without rows has no tiles and no T_j partials to fold.
      t.fold = t.fold &&
          (t.item_end > t.item_begin || AF_FAULT(Fault::PartialsWithoutRows));
    }
    scratch_.resize(scratch_size);
    sums_.assign(items_.size(), ItemSums{});
  }

  void run(float t, float lr) {
    auto& pool = ThreadPool::instance();
    s_ = adafactor_step_scalars(t, lr, h_);
    if (stochastic()) {
      const AF_UINT step = static_cast<AF_UINT>(t);
      for (auto& p : plans_) {
        p.param_key = adafactor_stream_key(p.key, step, AF_STREAM_PARAM);
        p.exp_avg_key = adafactor_stream_key(p.key, step, AF_STREAM_EXP_AVG);
      }
    }
    size_t total = 0;
    for (auto& p : plans_) {
      total += p.geo.n;
    }
    // Waking the pool costs more than a tiny step.
    const bool serial = total < AF_CPU_TILE;

    pool.parallel_for(items_.size(), [&](size_t k) { pass1(k); }, serial);
    pool.parallel_for(
        plans_.size(), [&](size_t i) { finish_pass1(i); }, serial);
    if (any_needs_pass2()) {
      pool.parallel_for(items_.size(), [&](size_t k) { pass2(k); }, serial);
      pool.parallel_for(
          plans_.size(), [&](size_t i) { finish_pass2(i); }, serial);
    }
    pool.parallel_for(items_.size(), [&](size_t k) { pass3(k); }, serial);
  }

 private:
  AdafactorHyper h_;
  AdafactorStepScalars s_{};
  std::vector<TensorData<P, G>> data_;
  std::vector<TensorPlan> plans_;
  std::vector<Item> items_;
  std::vector<float> scratch_;
  std::vector<ItemSums> sums_;

  void pass1(size_t k) {
    const Item& it = items_[k];
    const auto& t = plans_[it.tensor];
    if (t.geo.factored) {
      sums_[k] =
          pass1_factored(data_[it.tensor], t, it, h_, s_, scratch_.data());
    } else {
      sums_[k] = pass1_flat(data_[it.tensor], t, it, h_, s_);
    }
  }

  void pass2(size_t k) {
    const Item& it = items_[k];
    const auto& t = plans_[it.tensor];
    if (t.geo.factored && t.needs_pass2) {
      sums_[k].u2 = pass2_factored(data_[it.tensor], t, it, scratch_.data());
    }
  }

  void pass3(size_t k) {
    const Item& it = items_[k];
    const auto& x = data_[it.tensor];
    const auto& t = plans_[it.tensor];
    const float* scratch = scratch_.data();
    with_options([&](auto momentum, auto decay, auto stochastic) {
      cpu::pass3<momentum(), decay(), stochastic()>(x, t, it, h_, scratch);
    });
  }

  // Call f with the step's options as std::bool_constant arguments
  // (momentum, weight decay, stochastic rounding).
  template <typename F>
  void with_options(F f) const {
    auto decay = [&](auto momentum) {
      auto rounding = [&](auto momentum, auto decay) {
        stochastic() ? f(momentum, decay, std::true_type{})
                     : f(momentum, decay, std::false_type{});
      };
      has_flag(AF_WEIGHT_DECAY) ? rounding(momentum, std::true_type{})
                                : rounding(momentum, std::false_type{});
    };
    has_flag(AF_MOMENTUM) ? decay(std::true_type{}) : decay(std::false_type{});
  }

  bool has_flag(int flag) const {
    return (h_.flags & flag) != 0;
  }

  // NOTE: [stochastic rounding] applies: asked for, and a 16-bit storage.
  bool stochastic() const {
    return has_flag(AF_STOCHASTIC_ROUNDING) && !std::is_same_v<P, float>;
  }

  bool any_needs_pass2() const {
    for (auto& t : plans_) {
      if (t.geo.factored && t.needs_pass2) {
        return true;
      }
    }
    return false;
  }

  // Sum of one field of the tensor's item sums, in item order
  // (NOTE: [chunked sums]).
  template <typename F>
  float item_sum(const TensorPlan& t, F field) const {
    if (AF_FAULT(Fault::CombineOrderByThreads) &&
        ThreadPool::instance().num_threads() > 1) {
      float acc = 0.0f;
      for (size_t k = t.item_end; k-- > t.item_begin;) {
        acc += field(sums_[k]);
      }
      return acc;
    }
    return chunked_sum(t.item_begin, t.item_end, [&](int64_t k) {
      return field(sums_[k]);
    });
  }

  float clip_scale(float sum_u2, const TensorPlan& t) const {
    if (AF_FAULT(Fault::NoClipping)) {
      return 1.0f;
    }
    return adafactor_clip_scale(sum_u2, t.geo.inv_n, h_);
  }

  // The reductions of pass 1 made into the tensor's scalars, its new
  // second-moment state and its factors.
  void finish_pass1(size_t i) {
    auto& t = plans_[i];
    t.ts.lr = adafactor_tensor_lr(
        item_sum(t, [](const ItemSums& s) { return s.p2; }), t.geo.inv_n, s_,
        h_);
    if (!t.geo.factored) {
      t.ts.clip_scale =
          clip_scale(item_sum(t, [](const ItemSums& s) { return s.u2; }), t);
      return;
    }
    bool fold = t.fold;
    for (size_t k = t.item_begin; fold && k < t.item_end; ++k) {
      fold = sums_[k].fold_ok;
    }
    double sum_u2 = 0.0;
    for (int64_t b = 0; b < t.geo.batch; ++b) {
      const float row_mean = finish_rows(i, b);
      finish_cols(i, b, fold);
      if (fold) {
        sum_u2 += folded_sum_u2(i, b, row_mean);
      }
    }
    const float sum_u2_total = static_cast<float>(sum_u2);
    t.needs_pass2 = !(fold && std::isfinite(sum_u2_total));
    if (!t.needs_pass2) {
      t.ts.clip_scale = clip_scale(sum_u2_total, t);
    }
  }

  // Row EMAs of matrix b from the tiles' row sums, then the row factors
  // relative to the mean of the new rows; returns that mean.
  float finish_rows(size_t i, int64_t b) {
    const auto& t = plans_[i];
    const auto& x = data_[i];
    const int64_t R = t.geo.rows;
    const int64_t ncb = t.tiles.n_col_blocks;
    const float* row_part = scratch_.data() + t.scratch.row_part;
    float* row_fac = scratch_.data() + t.scratch.row_fac;
    // Sum the new rows in chunks of kSumChunk rows, then the chunk sums
    // (NOTE: [chunked sums]). The chunk sums wait in the row factors'
    // scratch, which is written only once the mean is known.
    const int64_t n_chunks = (R + kSumChunk - 1) / kSumChunk;
    float* chunk_sums = row_fac + b * R;
    float running = 0.0f; // one running sum, for the planted fault only
    for (int64_t rc = 0; rc < R; rc += kSumChunk) {
      const int64_t rc1 = std::min<int64_t>(R, rc + kSumChunk);
      float chunk = 0.0f;
      for (int64_t r = rc; r < rc1; ++r) {
        const int64_t rr = b * R + r;
        const float* part = row_part + rr * ncb;
        const float s =
            chunked_sum(0, ncb, [part](int64_t j) { return part[j]; });
        const float v = new_row(x, t, rr, s, s_);
        x.row_out[rr] = v;
        chunk += v;
        running += v;
      }
      chunk_sums[rc / kSumChunk] = chunk;
    }
    const float row_total = AF_FAULT(Fault::SequentialRowSum)
        ? running
        : chunked_sum(0, n_chunks, [chunk_sums](int64_t k) {
            return chunk_sums[k];
          });
    const float inv = AF_FAULT(Fault::RowMeanOverColumns) ? t.geo.inv_cols
                                                          : t.geo.inv_rows;
    const float row_mean = row_total * inv;
    for (int64_t r = 0; r < R; ++r) {
      const int64_t rr = b * R + r;
      row_fac[rr] = adafactor_row_factor(x.row_out[rr], row_mean);
    }
    return row_mean;
  }

  // Column EMAs and factors of matrix b from the row-block partials, added
  // in row-block order into row block 0's, a vectorizable row at a time.
  void finish_cols(size_t i, int64_t b, bool fold) {
    const auto& t = plans_[i];
    const auto& x = data_[i];
    const int64_t C = t.geo.cols;
    const int64_t nrb = t.tiles.n_row_blocks;
    float* col_sum = scratch_.data() + t.scratch.col_part + b * nrb * C;
    float* fold_sum = scratch_.data() + t.scratch.fold_part + b * nrb * C;
    float* col_fac = scratch_.data() + t.scratch.col_fac;
    for (int64_t k = 1; k < nrb; ++k) {
      add_row(col_sum, col_sum + k * C, C);
      if (fold) {
        add_row(fold_sum, fold_sum + k * C, C);
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      const int64_t cc = b * C + c;
      // A matrix without rows has no partials: its column sums are 0.
      const float sum = nrb > 0 || AF_FAULT(Fault::PartialsWithoutRows)
          ? col_sum[c]
          : 0.0f;
      const float v = adafactor_ema(x.col[cc], sum * t.geo.inv_rows, s_);
      x.col_out[cc] = v;
      col_fac[cc] = adafactor_col_factor(v);
    }
  }

  // NOTE: [folded update sum]: mean(r) * sum_j cf_j^2 T_j of matrix b.
  double folded_sum_u2(size_t i, int64_t b, float row_mean) const {
    const auto& t = plans_[i];
    const int64_t C = t.geo.cols;
    const float* fold_sum =
        scratch_.data() + t.scratch.fold_part + b * t.tiles.n_row_blocks * C;
    const float* col_fac = scratch_.data() + t.scratch.col_fac + b * C;
    const bool by_cf = AF_FAULT(Fault::FoldWeightsByCf);
    double acc = 0.0;
    for (int64_t c = 0; c < C; ++c) {
      const float cf = col_fac[c];
      acc += static_cast<double>(fold_sum[c]) * (by_cf ? cf : cf * cf);
    }
    return static_cast<double>(row_mean) * acc;
  }

  void finish_pass2(size_t i) {
    auto& t = plans_[i];
    if (t.geo.factored && t.needs_pass2) {
      t.ts.clip_scale =
          clip_scale(item_sum(t, [](const ItemSums& s) { return s.u2; }), t);
    }
  }

  static void add_row(float* acc, const float* row, int64_t n) {
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) {
      acc[c] += row[c];
    }
  }
};

} // namespace mlx_fused_adafactor::cpu
