// The `_ext` module: the fused step for the Python optimizer, in MLX's
// nanobind domain so that mx.array crosses the boundary as MLX's own type.

#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>

#include "mlx/utils.h"

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

  // NOTE: [self-check], NOTE: [kernel library]: what
  // `python -m mlx_fused_adafactor.check` reports.
  m.def(
      "device_status",
      [](const std::string& device) {
        if (device != "cpu" && device != "gpu") {
          throw nb::value_error("[adafactor] device must be 'cpu' or 'gpu'.");
        }
        const mlx::core::Device d =
            device == "cpu" ? mlx::core::Device::cpu : mlx::core::Device::gpu;
        af::DeviceStatus st;
        {
          nb::gil_scoped_release release;
          st = af::device_status(mlx::core::default_stream(d));
        }
        nb::dict check;
        check["passed"] = st.check.passed;
        check["cases"] = st.check.cases;
        check["outputs"] = st.check.outputs;
        check["max_error"] = st.check.max_error;
        check["max_error_vs_tolerance"] = st.check.max_error_vs_tolerance;
        check["seconds"] = st.check.seconds;
        check["failure"] = st.check.failure;
        nb::dict out;
        out["ready"] = st.ready;
        out["path"] = st.path;
        out["why"] = st.why;
        out["failed"] = st.failed;
        out["self_check"] = check;
        return out;
      },
      "device"_a,
      "Whether the fused kernels of `device` ('cpu' or 'gpu') are ready, "
      "where they come from and how their self-check went; the first call "
      "for a device runs the check.");
  m.def(
      "self_check_tolerances",
      [] {
        nb::dict d;
        d["float32"] = af::self_check_tolerance(mlx::core::float32);
        d["float16"] = af::self_check_tolerance(mlx::core::float16);
        d["bfloat16"] = af::self_check_tolerance(mlx::core::bfloat16);
        d["state"] = af::self_check_state_tolerance();
        return d;
      },
      "The self-check's tolerance per storage dtype, and of the float32 "
      "state entries.");
  m.def(
      "kernel_source",
      [] { return std::string(af::metal::kernel_source()); },
      "The Metal kernel source compiled into the extension.");
  m.attr("kernel_source_sha256") = af::metal::kernel_source_sha256();
  m.def(
      "metallib_path",
      []() -> std::optional<std::string> {
        std::string p = af::metal::metallib_path();
        return p.empty() ? std::nullopt : std::optional<std::string>(p);
      },
      "The .metallib installed next to the extension, if any; without one "
      "a Mac compiles kernel_source() at first use.");

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
