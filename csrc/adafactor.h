// The fused Adafactor step as an MLX operation and primitive.
//
// One operation evaluates the whole optimizer step for every parameter of a
// dtype group: it takes (step, learning_rate) and, per tensor, the parameter,
// its gradient and its state, and returns the new parameter and state. It
// runs eagerly outside transformations (NOTE: [eager step]) and otherwise as
// AdafactorStep primitives of at most kMaxLazyOutputs outputs each
// (NOTE: [lazy chunks]).
//
// Input layout (NOTE: [slot layout]):
//   inputs  = [step, learning_rate, <tensor 0 slots>, <tensor 1 slots>, ...]
//   tensor slots  = param, grad, second-moment state..., exp_avg (momentum)
//   outputs = per tensor: param, second-moment state..., exp_avg (momentum)
// where the second-moment state is (exp_avg_sq_row, exp_avg_sq_col) for
// ndim >= 2 and (exp_avg_sq) otherwise, all float32.

#pragma once

#include <string>
#include <vector>

#include "mlx/ops.h"
#include "mlx/primitives.h"

#include "adafactor_math.h"

namespace mx = mlx::core;

namespace mlx_fused_adafactor {

// Slot indices of the step-wide inputs.
constexpr int kStepIdx = 0;
constexpr int kLrIdx = 1;
constexpr int kFirstTensorIdx = 2;

// Slot offsets within one tensor's inputs.
constexpr int kParamIdx = 0;
constexpr int kGradIdx = 1;
constexpr int kRowIdx = 2; // factored: exp_avg_sq_row
constexpr int kColIdx = 3; // factored: exp_avg_sq_col
constexpr int kSqIdx = 2; // not factored: exp_avg_sq

// Outputs of one lazy primitive at most (NOTE: [lazy chunks]).
constexpr size_t kMaxLazyOutputs = 48;

// Parameters with at least this many dimensions use factored statistics.
constexpr int kFactoredMinNdim = 2;

inline bool is_float_storage(mx::Dtype t) {
  return t == mx::float32 || t == mx::float16 || t == mx::bfloat16;
}

inline bool is_factored(const mx::array& p) {
  return p.ndim() >= kFactoredMinNdim;
}

// Number of second-moment state arrays of a tensor.
inline int num_second_moment(bool factored) {
  return factored ? 2 : 1;
}

// Number of input slots (with param and grad) and output slots of a tensor.
inline int num_inputs(bool factored, bool momentum) {
  return 2 + num_second_moment(factored) + (momentum ? 1 : 0);
}
inline int num_outputs(bool factored, bool momentum) {
  return 1 + num_second_moment(factored) + (momentum ? 1 : 0);
}

// Build the fused step. `states[i]` holds tensor i's state in the order of
// the slot layout. `names[i]` is the parameter path used in error messages.
// Throws std::invalid_argument naming the path on bad input.
//
// NOTE: [eager step]
// MLX's graph bookkeeping costs a few microseconds per output array (siblings
// of a multi-output primitive, detach, hashing), which is more than the math
// of a 1K-element tensor. With `allow_eager`, on a CPU stream and with no
// input under a transformation (no tracer: not inside mx.compile, grad or
// vmap), the step therefore evaluates its inputs and runs at once, returning
// plain evaluated arrays. Otherwise it returns the outputs of one lazy
// AdafactorStep primitive. Both run the same CPU code (make_cpu_runner).
std::vector<mx::array> adafactor_step(
    const mx::array& step,
    const mx::array& learning_rate,
    const std::vector<mx::array>& params,
    const std::vector<mx::array>& grads,
    const std::vector<std::vector<mx::array>>& states,
    const std::vector<std::string>& names,
    const AdafactorHyper& hyper,
    bool allow_eager,
    mx::StreamOrDevice s = {});

class AdafactorStep : public mx::Primitive {
 public:
  AdafactorStep(mx::Stream stream, AdafactorHyper hyper, int num_tensors)
      : mx::Primitive(stream), hyper_(hyper), num_tensors_(num_tensors) {}

  void eval_cpu(
      const std::vector<mx::array>& inputs,
      std::vector<mx::array>& outputs) override;
  void eval_gpu(
      const std::vector<mx::array>& inputs,
      std::vector<mx::array>& outputs) override;

  const char* name() const override {
    return "AdafactorStep";
  }

  bool is_equivalent(const mx::Primitive& other) const override;

  std::vector<mx::Shape> output_shapes(
      const std::vector<mx::array>& inputs) override;

  const AdafactorHyper& hyper() const {
    return hyper_;
  }

 private:
  AdafactorHyper hyper_;
  int num_tensors_;
};

// A CPU step bound to its input and output buffers; execute() runs it once
// the inputs hold their data. Shared by the lazy primitive and the eager path.
struct StepRunner {
  virtual void execute(float t, float lr) = 0;
  virtual ~StepRunner() = default;
};

std::shared_ptr<StepRunner> make_cpu_runner(
    const AdafactorHyper& h,
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs);

// True when this build carries Metal kernels (macOS builds).
bool has_metal_kernels();

} // namespace mlx_fused_adafactor
