// Planted faults of the CPU path, for the tests that show the CPU tests
// catch a broken kernel.
//
// NOTE: [fault switch]
// A build configured with MFA_FAULTS=ON (only tests/support/variants.py
// makes one; it is never installed) defines AF_FAULTS: each AF_FAULT(f) in
// the passes then asks whether fault f was selected by the environment
// variable MLX_FUSED_ADAFACTOR_FAULT. tests/test_faults.py runs the CPU
// tests once per wrong-result fault, each of which must fail; the
// out-of-bounds faults read memory the step does not own, which only a
// sanitizer reliably sees, so tests/test_sanitizers_cpu.py shows that the
// AddressSanitizer run reports them. In every other build AF_FAULT is the
// constant `false`, so the faults compile away and the shipped code is the
// code without them.

#pragma once

namespace mlx_fused_adafactor::cpu {

enum class Fault : int {
  None = 0,
  DropLastColumn, // column partial sums leave out the last column of a tile
  RowMeanOverColumns, // the mean of the row state divides by the columns
  CombineOrderByThreads, // tile sums combined in a thread-dependent order
  UpdateRoundedEarly, // the update is rounded before the subtraction
  FlatWithoutEps1, // eps1 left out of the 1-D second moment
  NoClipping, // the update is never clipped
  FoldWeightsByCf, // the folded sum(u^2) weighs T_j by cf_j, not cf_j^2
  SequentialRowSum, // the mean of the row state is one running float sum
  StepHoldsGil, // apply_leaves keeps the GIL while the step evaluates
  NoDonation, // outputs never take over an input's buffer
  DonateHeld, // inputs give their buffer even while others hold them
  // Out of bounds:
  PartialsWithoutRows, // a matrix without rows folds and reads partials
  Count,
};

#if defined(AF_FAULTS)
bool fault_active(Fault f);
// MLX_FUSED_ADAFACTOR_SELF_CHECK=off: the CPU tests of tests/test_faults.py
// must run the planted fault, not the reference the self-check would fall
// back to (NOTE: [self-check]).
bool self_check_off();
const char* fault_name(Fault f);
#define AF_FAULT(f) (::mlx_fused_adafactor::cpu::fault_active(f))
#else
#define AF_FAULT(f) false
#endif

} // namespace mlx_fused_adafactor::cpu
