// The fused Adafactor step as an MLX operation.
//
// One operation computes the whole optimizer step for every parameter of a
// dtype group: it takes (step, learning_rate) and, per tensor, the
// parameter, its gradient and its state (NOTE: [slot layout]), and returns
// the new parameter and state. Where it runs (NOTE: [backend]):
//   - the pure-MLX implementation (NOTE: [reference]) on streams without
//     fused kernels, when the reference backend is chosen, or for float64
//     (NOTE: [float64]);
//   - at once for small tensors, and deferred for large ones, on the CPU
//     outside transformations (NOTE: [eager step]);
//   - otherwise as one AdafactorStep primitive per tensor (NOTE: [lazy
//     chunks]), whose derivatives come from the reference.

#pragma once

#include <optional>
#include <string>
#include <vector>

#include "mlx/array.h"
#include "mlx/distributed/distributed.h"
#include "mlx/utils.h"

#include "adafactor_math.h"

namespace mlx_fused_adafactor {

namespace mx = mlx::core;

// Parameters of at least this many bytes are deferred outside
// transformations (NOTE: [eager step]).
constexpr size_t kDeferMinBytes = size_t(1) << 20;

// A shape as Python prints it ("(3,)", "(2, 4)"), for error messages.
std::string shape_str(const mx::Shape& shape);

// NOTE: [float64]
// MLX computes in float64 on the CPU only, and stock trains float64
// parameters there. The fused kernels take float32, float16 and bfloat16;
// a dtype group with float64 parameters or gradients therefore runs the
// reference (NOTE: [reference]) whatever the backend (NOTE: [backend]); it
// computes in float64 for float64 parameters and keeps their second moment
// in float64 (entry_dtype). The
// step count, the learning rate and the hyper-parameters enter it as the
// float32 values the kernels see; stock's beta_2 and relative step are
// float32 values too.

// Build the fused step. `states[i]` holds tensor i's state entries in the
// order of state_entries() (NOTE: [slot layout]); `names[i]` is the
// parameter path used in error messages. With a `shard_group`, every
// parameter is this rank's shard (NOTE: [sharded step]) and the step is the
// reference implementation with collectives. Throws std::invalid_argument
// naming the path on bad input, before anything is built.
//
// NOTE: [eager step]
// MLX's graph bookkeeping costs a few microseconds per output array
// (siblings of a multi-output primitive, detach, hashing), which is more
// than the math of a 1K-element tensor. On a CPU stream and with no input
// under a transformation (no tracer: not inside mx.compile, grad or vmap),
// the step therefore evaluates the inputs of its small tensors and runs
// them at once, returning plain evaluated arrays. Tensors of at least
// kDeferMinBytes are deferred instead, as lazy AdafactorStep primitives
// evaluated with the caller's mx.eval: by then the caller has usually
// dropped the old parameters and state (Optimizer.update replaces them in
// the model and the state dict), so their buffers take the new values in
// place (NOTE: [donation]) and the step needs neither fresh memory nor
// its page faults. Under a transformation every tensor is lazy. All paths
// run the same CPU code.
std::vector<mx::array> adafactor_step(
    const mx::array& step,
    const mx::array& learning_rate,
    const std::vector<mx::array>& params,
    const std::vector<mx::array>& grads,
    const std::vector<std::vector<mx::array>>& states,
    const std::vector<std::string>& names,
    const AdafactorHyper& hyper,
    const std::optional<mx::distributed::Group>& shard_group = std::nullopt,
    mx::StreamOrDevice s = {});

} // namespace mlx_fused_adafactor
