// The CPU backend of the fused step (csrc/cpu/): the entry points the op and
// the primitive call.

#pragma once

#include <memory>
#include <vector>

#include "mlx/array.h"
#include "mlx/stream.h"

#include "adafactor_math.h"
#include "schema/slots.h"

namespace mlx_fused_adafactor::cpu {

// A CPU step bound to its input and output buffers; execute() runs it once
// the inputs hold their data.
class StepRunner {
 public:
  virtual void execute(float t, float lr) = 0;
  virtual ~StepRunner() = default;
};

// The step over `inputs` (NOTE: [slot layout]) writing `outputs`, whose
// buffers must be set; `keys[i]` is tensor i's key (NOTE: [stochastic
// rounding]).
std::shared_ptr<StepRunner> make_runner(
    const AdafactorHyper& h,
    const std::vector<AF_UINT>& keys,
    const SlotLayout& layout,
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs);

// AdafactorStep::eval_cpu: give the outputs buffers (an input's own when
// it can be donated, NOTE: [donation]) and encode the step on the stream.
void eval(
    const AdafactorHyper& h,
    const std::vector<AF_UINT>& keys,
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs,
    mx::Stream stream);

// NOTE: [eager step]: evaluate `inputs` and run the step at once; returns
// evaluated outputs of the given shapes and dtypes, in fresh buffers
// (NOTE: [output buffers]).
std::vector<mx::array> run_eager(
    const AdafactorHyper& h,
    const std::vector<AF_UINT>& keys,
    const SlotLayout& layout,
    std::vector<mx::array> inputs,
    std::vector<mx::Shape> shapes,
    const std::vector<mx::Dtype>& dtypes);

} // namespace mlx_fused_adafactor::cpu
