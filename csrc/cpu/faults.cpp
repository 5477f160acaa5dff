// NOTE: [fault switch]; compiled only into builds with AF_FAULTS.

#include "cpu/faults.h"

#if defined(AF_FAULTS)

#include <cstdlib>
#include <string>

namespace mlx_fused_adafactor::cpu {

bool fault_active(Fault f) {
  static const int selected = [] {
    const char* env = std::getenv("MLX_FUSED_ADAFACTOR_FAULT");
    return env ? std::atoi(env) : 0;
  }();
  return static_cast<int>(f) == selected;
}

bool self_check_off() {
  const char* env = std::getenv("MLX_FUSED_ADAFACTOR_SELF_CHECK");
  return env && std::string(env) == "off";
}

const char* fault_name(Fault f) {
  switch (f) {
    case Fault::DropLastColumn:
      return "drop_last_column";
    case Fault::RowMeanOverColumns:
      return "row_mean_over_columns";
    case Fault::CombineOrderByThreads:
      return "combine_order_by_threads";
    case Fault::UpdateRoundedEarly:
      return "update_rounded_early";
    case Fault::FlatWithoutEps1:
      return "flat_without_eps1";
    case Fault::NoClipping:
      return "no_clipping";
    case Fault::FoldWeightsByCf:
      return "fold_weights_by_cf";
    case Fault::SequentialRowSum:
      return "sequential_row_sum";
    case Fault::StepHoldsGil:
      return "step_holds_gil";
    case Fault::NoDonation:
      return "no_donation";
    case Fault::DonateHeld:
      return "donate_held";
    case Fault::PartialsWithoutRows:
      return "partials_without_rows";
    default:
      return "none";
  }
}

} // namespace mlx_fused_adafactor::cpu

#endif
