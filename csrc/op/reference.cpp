#include "op/reference.h"

#include "mlx/distributed/ops.h"
#include "mlx/ops.h"
#include "mlx/transforms.h"

#include "schema/hyper.h"
#include "schema/slots.h"

namespace mlx_fused_adafactor {

namespace {

mx::array u32(uint32_t v) {
  return mx::array(v, mx::uint32);
}

// adafactor_fmix32 (kernels/adafactor_math.h) on uint32 arrays.
mx::array fmix32(mx::array x, mx::Stream s) {
  x = mx::bitwise_xor(x, mx::right_shift(x, u32(16), s), s);
  x = mx::multiply(x, u32(0x85ebca6bu), s);
  x = mx::bitwise_xor(x, mx::right_shift(x, u32(13), s), s);
  x = mx::multiply(x, u32(0xc2b2ae35u), s);
  return mx::bitwise_xor(x, mx::right_shift(x, u32(16), s), s);
}

// The random bits of every element of a stream (adafactor_stream_key and
// adafactor_random_bits); `step` is the float32 step count.
mx::array random_bits(
    AF_UINT tensor_key,
    const mx::array& step,
    AF_UINT stream,
    const mx::Shape& shape,
    uint64_t offset,
    mx::Stream s) {
  const mx::array t = mx::astype(step, mx::uint32, s);
  mx::array key = fmix32(
      mx::bitwise_xor(u32(tensor_key), mx::multiply(t, u32(0x9e3779b9u), s), s),
      s);
  key = fmix32(
      mx::bitwise_xor(key, u32(stream * 0x85ebca77u + 0x27d4eb2fu), s), s);
  size_t n = 1;
  for (auto d : shape) {
    n *= d;
  }
  const mx::array index = mx::reshape(
      mx::add(
          mx::arange(0.0, static_cast<double>(n), 1.0, mx::uint64, s),
          mx::array(offset, mx::uint64),
          s),
      shape,
      s);
  const mx::array lo = mx::astype(index, mx::uint32, s);
  const mx::array hi = mx::astype(mx::right_shift(index, mx::array(32, mx::uint64), s), mx::uint32, s);
  return fmix32(
      mx::add(
          mx::bitwise_xor(lo, key, s),
          mx::multiply(hi, u32(0x9e3779b9u), s),
          s),
      s);
}

// adafactor_round_bf16 on arrays.
mx::array round_bf16(const mx::array& v, const mx::array& bits, mx::Stream s) {
  const mx::array u = mx::view(v, mx::uint32, s);
  const mx::array mag = mx::bitwise_and(u, u32(0x7fffffffu), s);
  const mx::array up = mx::bitwise_and(
      mx::add(u, mx::bitwise_and(bits, u32(0xffffu), s), s),
      u32(0xffff0000u),
      s);
  const mx::array overflow = mx::equal(
      mx::bitwise_and(up, u32(0x7f800000u), s), u32(0x7f800000u), s);
  const mx::array r = mx::where(
      overflow, mx::bitwise_and(u, u32(0xffff0000u), s), up, s);
  return mx::where(
      mx::greater_equal(mag, u32(0x7f7f8000u), s),
      v,
      mx::view(r, mx::float32, s),
      s);
}

// adafactor_round_f16 on arrays.
mx::array round_f16(const mx::array& v, const mx::array& bits, mx::Stream s) {
  const mx::array u = mx::view(v, mx::uint32, s);
  const mx::array mag = mx::bitwise_and(u, u32(0x7fffffffu), s);
  const mx::array a = mx::view(mag, mx::float32, s);
  const mx::array normal = mx::greater_equal(mag, u32(0x38800000u), s);
  const mx::array sub_spacing = mx::array(1.0f / 16777216.0f);
  const mx::array spacing = mx::where(
      normal,
      mx::view(
          mx::subtract(
              mx::bitwise_and(mag, u32(0x7f800000u), s), u32(10u << 23), s),
          mx::float32,
          s),
      sub_spacing,
      s);
  const mx::array lo = mx::where(
      normal,
      mx::view(mx::bitwise_and(mag, u32(0xffffe000u), s), mx::float32, s),
      mx::multiply(
          mx::astype(
              mx::astype(mx::multiply(a, mx::array(16777216.0f), s), mx::uint32, s),
              mx::float32,
              s),
          sub_spacing,
          s),
      s);
  const mx::array frac = mx::divide(mx::subtract(a, lo, s), spacing, s);
  const mx::array draw = mx::multiply(
      mx::astype(mx::right_shift(bits, u32(8), s), mx::float32, s),
      sub_spacing,
      s);
  mx::array r = mx::where(
      mx::less(draw, frac, s), mx::add(lo, spacing, s), lo, s);
  r = mx::where(mx::greater(r, mx::array(65504.0f), s), lo, r, s);
  r = mx::where(
      mx::equal(mx::bitwise_and(u, u32(0x80000000u), s), u32(0), s),
      r,
      mx::negative(r, s),
      s);
  return mx::where(mx::greater_equal(mag, u32(0x477ff000u), s), v, r, s);
}

// NOTE: [stochastic rounding] of float32 values `v` bound for `dtype`, as
// the fused step rounds them; `offset` is the index of v's first element in
// the whole tensor. Derivatives pass through unchanged.
mx::array round_stochastic(
    const mx::array& v,
    mx::Dtype dtype,
    AF_UINT tensor_key,
    const mx::array& step,
    AF_UINT stream,
    uint64_t offset,
    mx::Stream s) {
  auto fun = [=](const std::vector<mx::array>& in) {
    const mx::array bits =
        random_bits(tensor_key, in[1], stream, in[0].shape(), offset, s);
    return std::vector<mx::array>{
        dtype == mx::bfloat16 ? round_bf16(in[0], bits, s)
                              : round_f16(in[0], bits, s)};
  };
  auto identity_vjp = [](const std::vector<mx::array>& primals,
                         const std::vector<mx::array>& cotangents,
                         const std::vector<mx::array>&) {
    return std::vector<mx::array>{
        cotangents[0], mx::zeros_like(primals[1])};
  };
  auto identity_jvp = [](const std::vector<mx::array>&,
                         const std::vector<mx::array>& tangents,
                         const std::vector<int>& argnums) {
    for (size_t i = 0; i < argnums.size(); ++i) {
      if (argnums[i] == 0) {
        return std::vector<mx::array>{tangents[i]};
      }
    }
    return std::vector<mx::array>{mx::zeros_like(tangents[0])};
  };
  return mx::custom_function(fun, identity_vjp, identity_jvp)({v, step})[0];
}

// The step's per-tensor work, in the phases the sums across shards need
// (NOTE: [sharded step]).
class ReferenceStep {
 public:
  ReferenceStep(
      const AdafactorHyper& h,
      const std::vector<AF_UINT>& keys,
      const std::vector<mx::array>& inputs,
      const std::optional<mx::distributed::Group>& group,
      mx::Stream s)
      : h_(h),
        keys_(keys),
        inputs_(inputs),
        group_(group),
        s_(s),
        layout_(SlotLayout::of_inputs(inputs, h)),
        shards_(group ? group->size() : 1) {}

  std::vector<mx::array> run() {
    tensors_.reserve(layout_.size());
    std::vector<mx::array> partials;
    for (size_t i = 0; i < layout_.size(); ++i) {
      tensors_.push_back(second_moment(i));
      for (auto& a : tensors_.back().partials) {
        partials.push_back(a);
      }
    }
    // Sums over the shards: p^2, and the row state and column sums of
    // matrices split along their rows.
    auto totals = combine(partials);
    size_t k = 0;
    std::vector<mx::array> u2;
    for (size_t i = 0; i < layout_.size(); ++i) {
      auto& x = tensors_[i];
      for (auto& a : x.partials) {
        a = totals[k++];
      }
      u2.push_back(unclipped_update(i));
    }
    u2 = combine(u2);
    std::vector<mx::array> outputs;
    outputs.reserve(layout_.num_outputs());
    for (size_t i = 0; i < layout_.size(); ++i) {
      apply(i, u2[i], outputs);
    }
    return outputs;
  }

 private:
  // What the phases carry of one tensor.
  struct Tensor {
    mx::Dtype ct; // compute dtype: float32, or float64 for float64
    mx::array p, g, update, row = mx::array(0.0f), col = mx::array(0.0f);
    // Sums across the shards, in this order: sum(p^2), then for a matrix
    // split along its rows the sum of its new row state and its column
    // sums of g^2 + eps1.
    std::vector<mx::array> partials;
    bool rows_split = false;
    double n = 0; // elements of the whole tensor
    mx::array lr = mx::array(0.0f);
    std::vector<mx::array> new_state;
  };

  mx::array scalar(double v, mx::Dtype ct) const {
    return mx::array(v, ct);
  }

  // Sum each array over the shards: all ranks' values gathered, then added
  // by the same code on every rank, so every rank gets bitwise the same sum.
  std::vector<mx::array> combine(const std::vector<mx::array>& local) const {
    if (!group_ || shards_ == 1 || local.empty()) {
      return local;
    }
    std::vector<mx::array> flat;
    mx::Shape splits;
    int offset = 0;
    for (const auto& a : local) {
      flat.push_back(mx::reshape(mx::astype(a, mx::float32, s_), {-1}, s_));
      offset += a.size();
      splits.push_back(offset);
    }
    splits.pop_back();
    const mx::array gathered = mx::distributed::all_gather(
        mx::concatenate(flat, 0, s_), group_, s_);
    const mx::array total =
        mx::sum(mx::reshape(gathered, {shards_, offset}, s_), 0, false, s_);
    std::vector<mx::array> out;
    auto parts = splits.empty() ? std::vector<mx::array>{total}
                                : mx::split(total, splits, 0, s_);
    for (size_t i = 0; i < local.size(); ++i) {
      out.push_back(mx::astype(mx::reshape(parts[i], local[i].shape(), s_),
                               local[i].dtype(), s_));
    }
    return out;
  }

  mx::array ema(const mx::array& old, const mx::array& mean, mx::Dtype ct) {
    return mx::add(
        mx::multiply(beta_2(ct), old, s_),
        mx::multiply(mx::subtract(scalar(1.0, ct), beta_2(ct), s_), mean, s_),
        s_);
  }

  mx::array step(mx::Dtype ct) const {
    return mx::astype(inputs_[SlotLayout::kStep], ct, s_);
  }

  // stock: beta_2 = 1.0 - (step**decay_rate).
  mx::array beta_2(mx::Dtype ct) const {
    return mx::subtract(
        scalar(1.0, ct), mx::power(step(ct), scalar(h_.decay_rate, ct), s_), s_);
  }

  // stock: the relative step size, or the learning rate.
  mx::array rel_step(mx::Dtype ct) const {
    if (has_flag(h_, AF_RELATIVE_STEP)) {
      const mx::array min_step = has_flag(h_, AF_WARMUP_INIT)
          ? mx::multiply(scalar(1e-6, ct), step(ct), s_)
          : scalar(1e-2, ct);
      return mx::minimum(min_step, mx::rsqrt(step(ct), s_), s_);
    }
    return mx::astype(inputs_[SlotLayout::kLr], ct, s_);
  }

  // Phase 1: the new second moment where it needs no other shard, and the
  // partial sums.
  Tensor second_moment(size_t i) {
    const TensorSlots& t = layout_[i];
    const mx::array& param = inputs_[t.param_in()];
    const mx::Dtype ct =
        param.dtype() == mx::float64 ? mx::float64 : mx::float32;
    Tensor x{ct, mx::astype(param, ct, s_),
             mx::astype(inputs_[t.grad_in()], ct, s_), mx::array(0.0f)};
    x.n = static_cast<double>(param.size()) * shards_;
    // stock: update = square(gradient) + eps[0].
    x.update = mx::add(mx::square(x.g, s_), scalar(h_.eps1, ct), s_);
    x.partials.push_back(mx::sum(mx::square(x.p, s_), s_));
    auto state = [&](Entry e) { return mx::astype(inputs_[t.state_in(e)], ct, s_); };
    if (t.factored()) {
      // Whole rows are on every shard: the row state is local.
      x.row = ema(state(Entry::Row), mx::mean(x.update, -1, false, s_), ct);
      x.rows_split = shards_ > 1 && t.ndim == 2;
      if (x.rows_split) {
        x.partials.push_back(mx::sum(x.row, s_));
        x.partials.push_back(mx::sum(x.update, -2, false, s_));
      } else {
        x.col = ema(state(Entry::Col), mx::mean(x.update, -2, false, s_), ct);
      }
    } else {
      x.row = ema(state(Entry::Sq), x.update, ct);
    }
    return x;
  }

  // Phase 2: the learning rate, the factors and the unclipped update;
  // returns the partial sum of its squares.
  mx::array unclipped_update(size_t i) {
    const TensorSlots& t = layout_[i];
    Tensor& x = tensors_[i];
    const mx::Dtype ct = x.ct;
    const mx::array mean_p2 =
        mx::multiply(x.partials[0], scalar(1.0 / x.n, ct), s_);
    // stock: lr = max(eps[1], RMS(p)) * rel_step.
    x.lr = rel_step(ct);
    if (has_flag(h_, AF_SCALE_PARAMETER)) {
      x.lr = mx::multiply(
          mx::maximum(scalar(h_.eps2, ct), mx::sqrt(mean_p2, s_), s_), x.lr, s_);
    }
    if (!t.factored()) {
      x.new_state.push_back(x.row);
      x.update = mx::multiply(mx::rsqrt(x.row, s_), x.g, s_);
    } else {
      mx::array row_mean = mx::mean(x.row, -1, true, s_);
      if (x.rows_split) {
        const double rows = static_cast<double>(x.p.shape(-2)) * shards_;
        auto col = mx::astype(inputs_[t.state_in(Entry::Col)], ct, s_);
        x.col = ema(col, mx::multiply(x.partials[2], scalar(1.0 / rows, ct), s_), ct);
        row_mean = mx::multiply(x.partials[1], scalar(1.0 / rows, ct), s_);
      }
      x.new_state.push_back(x.row);
      x.new_state.push_back(x.col);
      // stock: (r_factor[..., None] * c_factor[..., None, :]) * gradient.
      const mx::array r_factor =
          mx::rsqrt(mx::divide(x.row, row_mean, s_), s_);
      const mx::array c_factor = mx::rsqrt(x.col, s_);
      x.update = mx::multiply(
          mx::multiply(
              mx::expand_dims(r_factor, -1, s_),
              mx::expand_dims(c_factor, -2, s_),
              s_),
          x.g,
          s_);
    }
    return mx::sum(mx::square(x.update, s_), s_);
  }

  // Phase 3: clip, scale, momentum, weight decay; the new parameter and
  // state go to `outputs`.
  void apply(size_t i, const mx::array& sum_u2, std::vector<mx::array>& outputs) {
    const TensorSlots& t = layout_[i];
    Tensor& x = tensors_[i];
    const mx::Dtype ct = x.ct;
    const mx::Dtype dtype = inputs_[t.param_in()].dtype();
    // stock: update = lr * (update / max(1, RMS(update) / clip_threshold)).
    const mx::array rms_u = mx::sqrt(
        mx::multiply(sum_u2, scalar(1.0 / x.n, ct), s_), s_);
    mx::array update = mx::multiply(
        x.lr,
        mx::divide(
            x.update,
            mx::maximum(
                scalar(1.0, ct),
                mx::divide(rms_u, scalar(h_.clip_threshold, ct), s_),
                s_),
            s_),
        s_);
    // NOTE: [stochastic rounding] of what is stored in 16 bits; a shard's
    // elements follow those of the shards before it.
    const bool stochastic = has_flag(h_, AF_STOCHASTIC_ROUNDING) &&
        (dtype == mx::bfloat16 || dtype == mx::float16);
    const uint64_t offset =
        group_ ? static_cast<uint64_t>(group_->rank()) * x.p.size() : 0;
    auto store = [&](const mx::array& v, AF_UINT stream) {
      const mx::array r = stochastic
          ? round_stochastic(v, dtype, keys_[i], inputs_[SlotLayout::kStep],
                             stream, offset, s_)
          : v;
      return mx::astype(r, dtype, s_);
    };
    if (t.has(Entry::ExpAvg)) {
      const mx::array m = mx::add(
          mx::multiply(
              scalar(h_.beta1, ct),
              mx::astype(inputs_[t.state_in(Entry::ExpAvg)], ct, s_),
              s_),
          mx::multiply(scalar(h_.one_minus_beta1, ct), update, s_),
          s_);
      x.new_state.push_back(store(m, AF_STREAM_EXP_AVG));
      update = m;
    }
    mx::array p = x.p;
    if (has_flag(h_, AF_WEIGHT_DECAY)) {
      p = mx::add(
          p,
          mx::multiply(p, mx::multiply(scalar(-h_.weight_decay, ct), x.lr, s_), s_),
          s_);
    }
    outputs.push_back(store(mx::subtract(p, update, s_), AF_STREAM_PARAM));
    for (auto& a : x.new_state) {
      outputs.push_back(a);
    }
  }

  const AdafactorHyper& h_;
  const std::vector<AF_UINT>& keys_;
  const std::vector<mx::array>& inputs_;
  const std::optional<mx::distributed::Group>& group_;
  mx::Stream s_;
  SlotLayout layout_;
  int shards_;
  std::vector<Tensor> tensors_;
};

} // namespace

std::vector<mx::array> reference_step(
    const AdafactorHyper& h,
    const std::vector<AF_UINT>& keys,
    const std::vector<mx::array>& inputs,
    mx::Stream s,
    const std::optional<mx::distributed::Group>& group) {
  return ReferenceStep(h, keys, inputs, group, s).run();
}

} // namespace mlx_fused_adafactor
