// The hyper-parameters of the step.
//
// NOTE: [hyper-parameters]
// AdafactorHyper (kernels/adafactor_math.h) is the one type of the
// hyper-parameters in every layer: the kernels read it byte for byte, the
// CPU passes take it by value, the primitive compares it in is_equivalent,
// and Python sees it as `_ext.Hyper`, with the optimizer's option names
// (csrc/python/hyper.cpp). Its defaults are stated once, in the signature
// of `Adafactor.__init__`. Options are written only through the setters
// below: they validate the value (the message names the option) and derive
// the flags and the fields computed from an option (1 - beta_1), so no other
// code builds flags by hand.

#pragma once

#include <optional>
#include <string>

#include "adafactor_math.h"

namespace mlx_fused_adafactor {

// A hyper-parameter object with every field zero. Only meaningful once each
// option has been set.
AdafactorHyper empty_hyper();

// Setters of the options; each throws std::invalid_argument naming the
// option when the value is meaningless or not finite, and then leaves `h`
// unchanged.
void set_eps(AdafactorHyper& h, double eps1, double eps2);
void set_clip_threshold(AdafactorHyper& h, double value);
void set_decay_rate(AdafactorHyper& h, double value);
void set_beta_1(AdafactorHyper& h, std::optional<double> value);
void set_weight_decay(AdafactorHyper& h, double value);
void set_flag(AdafactorHyper& h, int flag, bool on);
void set_seed(AdafactorHyper& h, long long value);

// The learning rate is not a field (it is an input of the step, and may be
// a schedule's value); a fixed one must be finite in float32, which is
// checked here, with the other options' rules.
void check_learning_rate(double value);

bool has_flag(const AdafactorHyper& h, int flag);
std::optional<float> beta_1(const AdafactorHyper& h);

// The key of the parameter at `path` (NOTE: [stochastic rounding]): the
// seed and the FNV-1a hash of the path's bytes.
AF_UINT tensor_key(const AdafactorHyper& h, const std::string& path);

// Bitwise equality of every field (is_equivalent, caches).
bool same_hyper(const AdafactorHyper& a, const AdafactorHyper& b);

} // namespace mlx_fused_adafactor
