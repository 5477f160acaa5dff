// The `_ext` module: the fused step for the Python optimizer, in MLX's
// nanobind domain so that mx.array crosses the boundary as MLX's own type.

#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>

#include "mlx/version.h"

#include "cpu/faults.h"
#include "cpu/thread_pool.h"
#include "metal/metal.h"
#include "op/backend.h"
#include "python/bindings.h"

namespace nb = nanobind;
using namespace nb::literals;
namespace af = mlx_fused_adafactor;

#define AF_STR2(x) #x
#define AF_STR(x) AF_STR2(x)

namespace {

// NOTE: [backend]: the one warning, as a Python RuntimeWarning. The step
// may run with the GIL released.
void python_warning(const std::string& message) {
  nb::gil_scoped_acquire gil;
  if (PyErr_WarnEx(PyExc_RuntimeWarning, message.c_str(), 1) < 0) {
    throw nb::python_error();
  }
}

} // namespace

NB_MODULE(_ext, m) {
  m.doc() = "Fused Adafactor step for MLX (C++ primitive).";

  // The MLX version the extension was compiled against, from MLX's headers.
  m.attr("mlx_build_version") = AF_STR(MLX_VERSION_MAJOR) "." AF_STR(
      MLX_VERSION_MINOR) "." AF_STR(MLX_VERSION_PATCH);
  m.attr("has_metal_kernels") = af::metal::has_kernels();

  af::bind_hyper(m);
  af::bind_step(m);

  // NOTE: [backend]. An invalid value of the variable stops the import.
  af::current_backend();
  af::set_warning_handler(python_warning);
  m.def(
      "backend",
      [] { return std::string(af::backend_name(af::current_backend())); },
      "The backend in force: auto, fused or reference.");
  m.def(
      "set_backend",
      [](std::optional<std::string> name) -> std::optional<std::string> {
        std::optional<af::Backend> b;
        if (name) {
          b = af::parse_backend(*name);
        }
        auto previous = af::set_backend_override(b);
        if (!previous) {
          return std::nullopt;
        }
        return std::string(af::backend_name(*previous));
      },
      "name"_a.none(),
      "Override the backend (None: back to the variable); returns the "
      "previous override.");

  m.def(
      "num_threads",
      [] { return af::cpu::ThreadPool::instance().num_threads(); },
      "Threads the CPU path spreads a step over.");

#if defined(AF_FAULTS)
  // NOTE: [fault switch]: only in fault builds, never installed.
  nb::dict faults;
  for (int f = 1; f < static_cast<int>(af::cpu::Fault::Count); ++f) {
    faults[af::cpu::fault_name(static_cast<af::cpu::Fault>(f))] = f;
  }
  m.attr("faults") = faults;
#endif
}
