#include "op/reference.h"

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
      mx::arange(0.0, static_cast<double>(n), 1.0, mx::uint64, s), shape, s);
  const mx::array lo = mx::astype(index, mx::uint32, s);
  const mx::array hi = mx::astype(mx::right_shift(index, mx::array(32, mx::uint64), s), mx::uint32, s);
  return fmix32(
      mx::bitwise_xor(
          fmix32(mx::bitwise_xor(lo, key, s), s), mx::add(hi, key, s), s),
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
// the fused step rounds them; derivatives pass through unchanged.
mx::array round_stochastic(
    const mx::array& v,
    mx::Dtype dtype,
    AF_UINT tensor_key,
    const mx::array& step,
    AF_UINT stream,
    mx::Stream s) {
  auto fun = [=](const std::vector<mx::array>& in) {
    const mx::array bits = random_bits(tensor_key, in[1], stream, in[0].shape(), s);
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

} // namespace

std::vector<mx::array> reference_step(
    const AdafactorHyper& h,
    const std::vector<AF_UINT>& keys,
    const std::vector<mx::array>& inputs,
    mx::Stream s) {
  const auto layout = SlotLayout::of_inputs(inputs, h);
  std::vector<mx::array> outputs;
  outputs.reserve(layout.num_outputs());
  for (size_t i = 0; i < layout.size(); ++i) {
    const TensorSlots& t = layout[i];
    const mx::array& param = inputs[t.param_in()];
    // All arithmetic in float32, or float64 for float64 parameters.
    const mx::Dtype ct = param.dtype() == mx::float64 ? mx::float64
                                                      : mx::float32;
    auto scalar = [ct](double v) { return mx::array(v, ct); };
    auto state = [&](Entry e) {
      return mx::astype(inputs[t.state_in(e)], ct, s);
    };
    const mx::array step = mx::astype(inputs[SlotLayout::kStep], ct, s);
    const mx::array p = mx::astype(param, ct, s);
    const mx::array g = mx::astype(inputs[t.grad_in()], ct, s);

    // stock: beta_2 = 1.0 - (step**decay_rate); the relative step size.
    const mx::array beta_2 = mx::subtract(
        scalar(1.0), mx::power(step, scalar(h.decay_rate), s), s);
    const mx::array one_minus_beta_2 = mx::subtract(scalar(1.0), beta_2, s);
    mx::array rel_step = mx::astype(inputs[SlotLayout::kLr], ct, s);
    if (has_flag(h, AF_RELATIVE_STEP)) {
      const mx::array min_step = has_flag(h, AF_WARMUP_INIT)
          ? mx::multiply(scalar(1e-6), step, s)
          : scalar(1e-2);
      rel_step = mx::minimum(min_step, mx::rsqrt(step, s), s);
    }
    // stock: lr = max(eps[1], RMS(p)) * rel_step.
    mx::array lr = rel_step;
    if (has_flag(h, AF_SCALE_PARAMETER)) {
      const mx::array rms = mx::sqrt(mx::mean(mx::square(p, s), s), s);
      lr = mx::multiply(mx::maximum(scalar(h.eps2), rms, s), rel_step, s);
    }

    auto ema = [&](const mx::array& old, const mx::array& mean) {
      return mx::add(
          mx::multiply(beta_2, old, s),
          mx::multiply(one_minus_beta_2, mean, s),
          s);
    };
    mx::array update = mx::add(mx::square(g, s), scalar(h.eps1), s);
    std::vector<mx::array> new_state;
    if (t.factored()) {
      const mx::array row = ema(state(Entry::Row), mx::mean(update, -1, false, s));
      const mx::array col = ema(state(Entry::Col), mx::mean(update, -2, false, s));
      new_state.push_back(row);
      new_state.push_back(col);
      const mx::array r_factor = mx::rsqrt(
          mx::divide(row, mx::mean(row, -1, true, s), s), s);
      const mx::array c_factor = mx::rsqrt(col, s);
      update = mx::multiply(
          mx::multiply(
              mx::expand_dims(r_factor, -1, s),
              mx::expand_dims(c_factor, -2, s),
              s),
          g,
          s);
    } else {
      const mx::array sq = ema(state(Entry::Sq), update);
      new_state.push_back(sq);
      update = mx::multiply(mx::rsqrt(sq, s), g, s);
    }

    // stock: update = lr * (update / max(1, RMS(update) / clip_threshold)).
    const mx::array rms_u = mx::sqrt(mx::mean(mx::square(update, s), s), s);
    update = mx::multiply(
        lr,
        mx::divide(
            update,
            mx::maximum(
                scalar(1.0),
                mx::divide(rms_u, scalar(h.clip_threshold), s),
                s),
            s),
        s);
    // NOTE: [stochastic rounding] of what is stored in 16 bits.
    const bool stochastic = has_flag(h, AF_STOCHASTIC_ROUNDING) &&
        (param.dtype() == mx::bfloat16 || param.dtype() == mx::float16);
    auto store = [&](const mx::array& v, AF_UINT stream) {
      const mx::array r = stochastic
          ? round_stochastic(
                v, param.dtype(), keys[i],
                inputs[SlotLayout::kStep], stream, s)
          : v;
      return mx::astype(r, param.dtype(), s);
    };
    if (t.has(Entry::ExpAvg)) {
      const mx::array m = mx::add(
          mx::multiply(scalar(h.beta1), state(Entry::ExpAvg), s),
          mx::multiply(scalar(h.one_minus_beta1), update, s),
          s);
      new_state.push_back(store(m, AF_STREAM_EXP_AVG));
      update = m;
    }
    mx::array p_new = p;
    if (has_flag(h, AF_WEIGHT_DECAY)) {
      p_new = mx::add(
          p_new,
          mx::multiply(p_new, mx::multiply(scalar(-h.weight_decay), lr, s), s),
          s);
    }
    outputs.push_back(store(mx::subtract(p_new, update, s), AF_STREAM_PARAM));
    for (auto& a : new_state) {
      outputs.push_back(std::move(a));
    }
  }
  return outputs;
}

} // namespace mlx_fused_adafactor
