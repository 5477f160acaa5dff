// NOTE: [self-check] (self_check.h).

#include "op/self_check.h"

#include <chrono>
#include <cmath>
#include <cstdio>
#include <memory>
#include <sstream>
#include <vector>

#include "mlx/ops.h"
#include "mlx/transforms.h"

#include "op/adafactor.h"
#include "op/primitive.h"
#include "op/reference.h"
#include "schema/hyper.h"
#include "schema/slots.h"

namespace mlx_fused_adafactor {

namespace {

// Every kernel and launch shape of the Metal plan (kernels/adafactor_args.h,
// csrc/metal/plan.cpp): 0-D, 1-D, factored 2-D and 3-D in one threadgroup
// (at most AF_SMALL_LIMIT elements); a 1-D tensor of two threadgroups of
// AF_FLAT_BLOCK; a factored tile of one row and one column block; two row
// blocks and two column blocks of AF_COL_BLOCK; a batch of three matrices.
const std::vector<mx::Shape> kShapes = {
    {}, {33}, {31, 33}, {2, 3, 5}, {9000}, {8, 1000}, {36, 1030}, {3, 20, 70}};

// Step count of the check: beta_2 well below one.
constexpr float kStep = 5.0f;

struct Case {
  mx::Dtype param;
  mx::Dtype grad;
  bool momentum; // with weight decay and a clip threshold that binds
  bool stochastic = false; // NOTE: [stochastic rounding]
};

std::vector<Case> cases() {
  const mx::Dtype types[] = {mx::float32, mx::float16, mx::bfloat16};
  std::vector<Case> out;
  for (mx::Dtype p : types) {
    for (mx::Dtype g : types) {
      if (p == g) {
        out.push_back({p, g, false});
      }
      out.push_back({p, g, true});
    }
    // Stochastic rounding: the stores of 16-bit parameters and exp_avg.
    if (p != mx::float32) {
      out.push_back({p, p, true, true});
    }
  }
  return out;
}

AdafactorHyper hyper_of(const Case& c) {
  const bool momentum = c.momentum;
  AdafactorHyper h = empty_hyper();
  set_eps(h, 1e-30, 1e-3);
  set_clip_threshold(h, momentum ? 0.05 : 1.0);
  set_decay_rate(h, -0.8);
  set_beta_1(h, momentum ? std::optional<double>(0.9) : std::nullopt);
  set_weight_decay(h, momentum ? 0.01 : 0.0);
  set_flag(h, AF_SCALE_PARAMETER, true);
  set_flag(h, AF_RELATIVE_STEP, true);
  set_flag(h, AF_WARMUP_INIT, false);
  set_flag(h, AF_STOCHASTIC_ROUNDING, c.stochastic);
  return h;
}

// A value in [-1, 1) from an integer hash of (stream, index).
float uniform(uint32_t stream, uint32_t i) {
  uint32_t x = i * 0x9E3779B9u + stream * 0x85EBCA6Bu + 0x165667B1u;
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return static_cast<float>(x >> 8) * (2.0f / 16777216.0f) - 1.0f;
}

// A float32 array of `shape` filled with a + b * uniform(stream, i) *
// (1 + uniform(stream + 1, i) / 2), but 0 at the first `zeros` elements.
mx::array filled(
    const mx::Shape& shape,
    uint32_t stream,
    float a,
    float b,
    size_t zeros = 0) {
  size_t n = 1;
  for (int d : shape) {
    n *= static_cast<size_t>(d);
  }
  std::vector<float> data(n);
  for (size_t i = 0; i < n; ++i) {
    const uint32_t k = static_cast<uint32_t>(i);
    data[i] = i < zeros
        ? 0.0f
        : a + b * uniform(stream, k) * (1.0f + 0.5f * uniform(stream + 1, k));
  }
  return mx::array(data.begin(), shape, mx::float32);
}

const char* dtype_name(mx::Dtype t) {
  return t == mx::float32 ? "float32"
      : t == mx::float16  ? "float16"
                          : "bfloat16";
}

std::string describe(const Case& c) {
  return std::string(dtype_name(c.param)) + " parameters, " +
      dtype_name(c.grad) + " gradients, " +
      (c.momentum ? "momentum" : "no momentum") +
      (c.stochastic ? ", stochastic rounding" : "");
}

// One output to compare.
struct Compared {
  std::string what;
  double tolerance;
};

} // namespace

double self_check_tolerance(mx::Dtype dtype) {
  switch (dtype) {
    case mx::float16:
      return std::ldexp(1.0, -10);
    case mx::bfloat16:
      return std::ldexp(1.0, -7);
    default:
      return 4e-6;
  }
}

double self_check_state_tolerance() {
  return 1e-5;
}

SelfCheckResult self_check(const mx::Stream& s) {
  const auto start = std::chrono::steady_clock::now();
  SelfCheckResult r;
  std::vector<Compared> compared;
  // Per output: elements out of tolerance, largest relative error, largest
  // error over tolerance.
  std::vector<mx::array> metrics;
  std::string building;
  try {
    std::vector<int> ndims;
    for (const auto& shape : kShapes) {
      ndims.push_back(static_cast<int>(shape.size()));
    }
    uint32_t seed = 1;
    for (const Case& c : cases()) {
      building = describe(c);
      const AdafactorHyper h = hyper_of(c);
      const SlotLayout layout(ndims, h);
      std::vector<mx::array> inputs = {
          mx::array(kStep, mx::float32), mx::array(0.0f, mx::float32)};
      std::vector<mx::Shape> shapes;
      std::vector<mx::Dtype> dtypes;
      for (size_t t = 0; t < kShapes.size(); ++t) {
        const mx::Shape& shape = kShapes[t];
        // The first row of each gradient (the first element of a 1-D one)
        // is zero, and so is the first 1-D second moment: a first step of
        // an unused entry, which only eps1 keeps finite.
        const size_t row = shape.size() >= 2 ? shape.back() : 1;
        seed += 2;
        inputs.push_back(mx::astype(filled(shape, seed, 0.0f, 1.0f), c.param, s));
        seed += 2;
        inputs.push_back(
            mx::astype(filled(shape, seed, 0.0f, 0.1f, row), c.grad, s));
        shapes.push_back(shape);
        dtypes.push_back(c.param);
        for (Entry e : layout[t].entries) {
          const mx::Shape es = entry_shape(e, shape);
          const mx::Dtype et = entry_dtype(e, c.param);
          seed += 2;
          const mx::array v = e == Entry::ExpAvg
              ? filled(es, seed, 0.0f, 0.01f)
              : filled(es, seed, 2e-3f, 1e-3f, e == Entry::Sq ? 1 : 0);
          inputs.push_back(mx::astype(v, et, s));
          shapes.push_back(es);
          dtypes.push_back(et);
        }
      }
      // NOTE: [stochastic rounding]: a key per tensor.
      std::vector<AF_UINT> keys;
      for (size_t t = 0; t < kShapes.size(); ++t) {
        keys.push_back(tensor_key(h, "self_check." + std::to_string(t)));
      }
      auto fused = mx::array::make_arrays(
          shapes, dtypes, std::make_shared<AdafactorStep>(s, h, keys), inputs);
      auto reference = reference_step(h, keys, inputs, s);

      for (size_t t = 0; t < kShapes.size(); ++t) {
        const TensorSlots& slots = layout[t];
        auto compare = [&](int out, const std::string& name, double tol) {
          const mx::array want = mx::astype(reference[out], mx::float32, s);
          const mx::array got = mx::astype(fused[out], mx::float32, s);
          const mx::array err = mx::abs(mx::subtract(got, want, s), s);
          const mx::array rms =
              mx::sqrt(mx::mean(mx::square(want, s), s), s);
          const mx::array scale = mx::add(
              mx::add(mx::abs(want, s), rms, s), mx::array(1e-30f), s);
          const mx::array bound =
              mx::multiply(scale, mx::array(static_cast<float>(tol)), s);
          // NaN errors count as out of tolerance.
          const mx::array bad = mx::sum(
              mx::logical_not(mx::less_equal(err, bound, s), s), s);
          metrics.push_back(mx::astype(bad, mx::float32, s));
          metrics.push_back(mx::max(mx::divide(err, scale, s), s));
          metrics.push_back(mx::max(mx::divide(err, bound, s), s));
          compared.push_back(
              {describe(c) + ", tensor " + shape_str(kShapes[t]) + " " + name,
               tol});
        };
        compare(
            slots.param_out(), "parameter", self_check_tolerance(c.param));
        for (Entry e : slots.entries) {
          compare(
              slots.state_out(e),
              entry_key(e),
              e == Entry::ExpAvg ? self_check_tolerance(c.param)
                                 : self_check_state_tolerance());
        }
      }
      ++r.cases;
    }
    building = "the comparison";
    mx::array all = mx::concatenate(
        [&] {
          std::vector<mx::array> flat;
          flat.reserve(metrics.size());
          for (const auto& m : metrics) {
            flat.push_back(mx::reshape(m, {1}, s));
          }
          return flat;
        }(),
        0,
        s);
    building = "the evaluation";
    mx::eval(all);
    const float* v = all.data<float>();
    r.outputs = static_cast<int>(compared.size());
    r.passed = true;
    for (size_t k = 0; k < compared.size(); ++k) {
      const float bad = v[3 * k];
      const double rel = v[3 * k + 1];
      const double over = v[3 * k + 2];
      r.max_error = std::isnan(rel) || rel > r.max_error ? rel : r.max_error;
      r.max_error_vs_tolerance = std::isnan(over) || over > r.max_error_vs_tolerance
          ? over
          : r.max_error_vs_tolerance;
      if (bad != 0 && r.passed) {
        r.passed = false;
        char buf[160];
        std::snprintf(
            buf,
            sizeof(buf),
            ": %.0f elements off, largest error %.3g, tolerance %.3g",
            bad,
            rel,
            compared[k].tolerance);
        r.failure = compared[k].what + buf;
      }
    }
  } catch (const std::exception& e) {
    r.passed = false;
    r.failure = "the fused step failed (" + building + "): " + e.what();
  }
  r.seconds = std::chrono::duration<double>(
                  std::chrono::steady_clock::now() - start)
                  .count();
  return r;
}

} // namespace mlx_fused_adafactor
