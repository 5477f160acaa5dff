#include "schema/hyper.h"

#include <cmath>
#include <cstring>
#include <sstream>
#include <stdexcept>
#include <type_traits>

namespace mlx_fused_adafactor {

static_assert(std::is_trivially_copyable_v<AdafactorHyper>);
static_assert(
    sizeof(AdafactorHyper) % 4 == 0,
    "AdafactorHyper is read by the kernels as 32-bit fields");

namespace {

[[noreturn]] void reject(const char* option, double value, const char* why) {
  std::ostringstream msg;
  msg << "[adafactor] " << option << " must be " << why << ", got " << value
      << ".";
  throw std::invalid_argument(msg.str());
}

void require_finite(const char* option, double value) {
  if (!std::isfinite(value)) {
    reject(option, value, "finite");
  }
}

// A finite value that is also finite as a float32, the type the step
// computes in.
float to_float(const char* option, double value) {
  require_finite(option, value);
  const float f = static_cast<float>(value);
  if (!std::isfinite(f)) {
    reject(option, value, "within the float32 range");
  }
  return f;
}

} // namespace

AdafactorHyper empty_hyper() {
  AdafactorHyper h;
  std::memset(&h, 0, sizeof(h));
  return h;
}

void set_eps(AdafactorHyper& h, double eps1, double eps2) {
  // eps[0] < 0 could make g^2 + eps[0] negative (rsqrt of it is NaN);
  // eps[1] < 0 is a floor below every RMS.
  if (!(eps1 >= 0)) {
    reject("eps[0]", eps1, ">= 0");
  }
  if (!(eps2 >= 0)) {
    reject("eps[1]", eps2, ">= 0");
  }
  const float e1 = to_float("eps[0]", eps1);
  const float e2 = to_float("eps[1]", eps2);
  h.eps1 = e1;
  h.eps2 = e2;
}

void set_clip_threshold(AdafactorHyper& h, double value) {
  // The update is divided by max(1, RMS(u) / clip_threshold).
  if (!(value > 0)) {
    reject("clip_threshold", value, "> 0");
  }
  h.clip_threshold = to_float("clip_threshold", value);
}

void set_decay_rate(AdafactorHyper& h, double value) {
  // beta_2 = 1 - t^decay_rate is a weight in [0, 1) for every step t >= 1
  // only when decay_rate <= 0 (0 keeps no memory of earlier steps).
  if (!(value <= 0)) {
    reject("decay_rate", value, "<= 0 (beta_2 = 1 - t^decay_rate)");
  }
  h.decay_rate = to_float("decay_rate", value);
}

void set_beta_1(AdafactorHyper& h, std::optional<double> value) {
  if (!value) {
    h.beta1 = 0.0f;
    h.one_minus_beta1 = 1.0f;
    set_flag(h, AF_MOMENTUM, false);
    return;
  }
  // The first moment is an average: beta_1 in [0, 1].
  if (!(*value >= 0 && *value <= 1)) {
    reject("beta_1", *value, "in [0, 1] or None");
  }
  h.beta1 = static_cast<float>(*value);
  // Stock computes (1 - beta_1) in Python floats, then rounds once.
  h.one_minus_beta1 = static_cast<float>(1.0 - *value);
  set_flag(h, AF_MOMENTUM, true);
}

void set_weight_decay(AdafactorHyper& h, double value) {
  h.weight_decay = to_float("weight_decay", value);
  set_flag(h, AF_WEIGHT_DECAY, value != 0);
}

void check_learning_rate(double value) {
  to_float("learning_rate", value);
}

void set_flag(AdafactorHyper& h, int flag, bool on) {
  h.flags = on ? (h.flags | flag) : (h.flags & ~flag);
}

void set_seed(AdafactorHyper& h, long long value) {
  // NOTE: [stochastic rounding]: a 32-bit key.
  if (value < 0 || value > 0xffffffffLL) {
    reject("seed", static_cast<double>(value), "in [0, 2^32)");
  }
  h.seed = static_cast<AF_UINT>(value);
}

bool has_flag(const AdafactorHyper& h, int flag) {
  return (h.flags & flag) != 0;
}

std::optional<float> beta_1(const AdafactorHyper& h) {
  if (has_flag(h, AF_MOMENTUM)) {
    return h.beta1;
  }
  return std::nullopt;
}

AF_UINT tensor_key(const AdafactorHyper& h, const std::string& path) {
  AF_UINT hash = 2166136261u;
  for (unsigned char c : path) {
    hash = (hash ^ c) * 16777619u;
  }
  return adafactor_tensor_key(h.seed, hash);
}

bool same_hyper(const AdafactorHyper& a, const AdafactorHyper& b) {
  return std::memcmp(&a, &b, sizeof(AdafactorHyper)) == 0;
}

} // namespace mlx_fused_adafactor
