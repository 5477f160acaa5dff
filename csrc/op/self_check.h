// The first-use check of the fused kernels against the reference.
//
// NOTE: [self-check]
// Before the fused kernels of a device compute a user's step, the process
// checks them once against the reference implementation (NOTE:
// [reference]) on the same device (NOTE: [backend] decides what a failure
// means). One check is one step over tensors that take every kernel and
// launch shape of the Metal plan: one-threadgroup tensors (0-D, 1-D,
// factored 2-D and 3-D), a 1-D tensor of two threadgroups, factored
// matrices of one tile and of two row and two column blocks, and a batch of
// matrices; for each (parameter, gradient) dtype pair of float32, float16
// and bfloat16, with the plain options and with momentum, weight decay and
// a clip threshold that binds (mixed pairs: the second only). The fused
// side runs through the AdafactorStep primitive (the eager CPU step runs
// the same CPU code); every output, parameter and state entry, must lie
// within the tolerance of its dtype:
//   |fused - reference| <= tol * (|reference| + RMS(reference))
// with the tolerances of tests/metal/test_metal_kernels.py (a test keeps
// the two equal). Inputs come from a fixed integer hash, never from MLX's
// random state, which belongs to the user's run. The check evaluates once,
// so it costs one synchronization of the device.

#pragma once

#include <string>

#include "mlx/dtype.h"
#include "mlx/stream.h"

namespace mlx_fused_adafactor {

namespace mx = mlx::core;

struct SelfCheckResult {
  bool passed = false;
  int cases = 0; // steps compared (0: not run)
  int outputs = 0; // arrays compared
  // Largest |fused - reference| / (|reference| + RMS(reference)).
  double max_error = 0.0;
  // Largest ratio of an error to its tolerance (<= 1 when passed).
  double max_error_vs_tolerance = 0.0;
  double seconds = 0.0;
  // The first failing output, or what threw; empty when passed.
  std::string failure;
};

// The tolerance of an output stored as `dtype`; float32 state entries
// (the second moments) have their own.
double self_check_tolerance(mx::Dtype dtype);
double self_check_state_tolerance();

// Run the check on `stream`. Never throws: an exception from the fused
// side is a failure.
SelfCheckResult self_check(const mx::Stream& stream);

} // namespace mlx_fused_adafactor
