#include "op/reference.h"

#include "mlx/ops.h"

#include "schema/hyper.h"
#include "schema/slots.h"

namespace mlx_fused_adafactor {

std::vector<mx::array> reference_step(
    const AdafactorHyper& h,
    const std::vector<mx::array>& inputs,
    mx::Stream s) {
  const auto layout = SlotLayout::of_inputs(inputs, h);
  std::vector<mx::array> outputs;
  outputs.reserve(layout.num_outputs());
  for (const auto& t : layout.tensors()) {
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
    if (t.has(Entry::ExpAvg)) {
      const mx::array m = mx::add(
          mx::multiply(scalar(h.beta1), state(Entry::ExpAvg), s),
          mx::multiply(scalar(h.one_minus_beta1), update, s),
          s);
      new_state.push_back(mx::astype(m, param.dtype(), s));
      update = m;
    }
    mx::array p_new = p;
    if (has_flag(h, AF_WEIGHT_DECAY)) {
      p_new = mx::add(
          p_new,
          mx::multiply(p_new, mx::multiply(scalar(-h.weight_decay), lr, s), s),
          s);
    }
    outputs.push_back(mx::astype(mx::subtract(p_new, update, s), param.dtype(), s));
    for (auto& a : new_state) {
      outputs.push_back(std::move(a));
    }
  }
  return outputs;
}

} // namespace mlx_fused_adafactor
