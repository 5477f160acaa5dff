// Python bindings of the fused step, in MLX's nanobind domain so that
// mx.array crosses the boundary as MLX's own type.

#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include "mlx/version.h"

#include "adafactor.h"
#include "buffer_cache.h"
#include "parallel.h"

namespace nb = nanobind;
using namespace nb::literals;
namespace af = mlx_fused_adafactor;

#define AF_STR2(x) #x
#define AF_STR(x) AF_STR2(x)

void bind_metal_plan(nb::module_& m); // bindings_metal.cpp
void bind_leaves(nb::module_& m); // bindings_leaves.cpp

NB_MODULE(_ext, m) {
  m.doc() = "Fused Adafactor step for MLX (C++ primitive).";

  // The MLX version the extension was compiled against, from MLX's headers.
  m.attr("mlx_build_version") = AF_STR(MLX_VERSION_MAJOR) "." AF_STR(
      MLX_VERSION_MINOR) "." AF_STR(MLX_VERSION_PATCH);
  m.attr("has_metal_kernels") = af::has_metal_kernels();

  m.def(
      "buffer_cache_bytes",
      [] { return af::BufferCache::instance().cached_bytes(); },
      "Bytes the eager step keeps for reuse (NOTE: [eager step]).");
  m.def(
      "clear_buffer_cache",
      [] { af::BufferCache::instance().clear(); },
      "Free the buffers the eager step keeps for reuse.");

  m.def("num_threads", [] { return af::ThreadPool::instance().num_threads(); },
        "Threads the CPU path spreads a step over.");

  m.def(
      "adafactor_step",
      [](const mx::array& step,
         const mx::array& learning_rate,
         const std::vector<mx::array>& params,
         const std::vector<mx::array>& grads,
         const std::vector<std::vector<mx::array>>& states,
         const std::vector<std::string>& names,
         float eps1,
         float eps2,
         float clip_threshold,
         float decay_rate,
         float beta1,
         float one_minus_beta1,
         float weight_decay,
         int flags,
         bool allow_eager,
         mx::StreamOrDevice s) {
        AdafactorHyper h{
            eps1,
            eps2,
            clip_threshold,
            decay_rate,
            beta1,
            one_minus_beta1,
            weight_decay,
            flags};
        return af::adafactor_step(
            step, learning_rate, params, grads, states, names, h, allow_eager,
            s);
      },
      "step"_a,
      "learning_rate"_a,
      "params"_a,
      "grads"_a,
      "states"_a,
      "names"_a,
      "eps1"_a,
      "eps2"_a,
      "clip_threshold"_a,
      "decay_rate"_a,
      "beta1"_a,
      "one_minus_beta1"_a,
      "weight_decay"_a,
      "flags"_a,
      nb::kw_only(),
      "allow_eager"_a = true,
      "stream"_a = nb::none(),
      "Build the fused step for tensors of one dtype group; returns, per "
      "tensor, the new parameter and state in slot order. With allow_eager, "
      "outside transformations on the CPU, the step runs at once.");

  bind_metal_plan(m);
  bind_leaves(m);

  m.attr("SCALE_PARAMETER") = AF_SCALE_PARAMETER;
  m.attr("RELATIVE_STEP") = AF_RELATIVE_STEP;
  m.attr("WARMUP_INIT") = AF_WARMUP_INIT;
  m.attr("MOMENTUM") = AF_MOMENTUM;
  m.attr("WEIGHT_DECAY") = AF_WEIGHT_DECAY;
}
