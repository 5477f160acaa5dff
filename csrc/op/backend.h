// Which implementation runs the step on a stream.
//
// NOTE: [backend]
// MLX_FUSED_ADAFACTOR_BACKEND chooses for the process: `auto` (default),
// `fused` or `reference`; `with mlx_fused_adafactor.backend(...)` overrides
// it for a scope. The choice is made per stream when the step is built, as
// MLX's fast ops do in use_fallback(stream):
//   reference  the pure-MLX implementation (NOTE: [reference]) everywhere;
//   fused      the fused kernels, or an error where they are not ready;
//   auto       the fused kernels where they are ready, else the reference
//              with one warning that says why and how to report it.
// The fused kernels exist on the CPU and, in Metal builds, on Apple GPUs.
// The first step that would use them on a device makes sure they are ready:
// on a GPU, the Metal library loaded or compiled with every pipeline built
// (NOTE: [kernel library]); on every device, a passed self-check (NOTE:
// [self-check]). Where they are not, the device runs the reference for the
// rest of the process. A step that raises has changed nothing.

#pragma once

#include <optional>
#include <string>

#include "mlx/stream.h"

#include "op/self_check.h"

namespace mlx_fused_adafactor {

enum class Backend { Auto, Fused, Reference };

// The name of a backend, as the variable spells it.
const char* backend_name(Backend b);
// Parse a value of the variable; throws std::invalid_argument naming it.
Backend parse_backend(const std::string& value);

// The backend in force: the scoped override, else the variable's value
// (read once; an invalid value throws).
Backend current_backend();
// Set or clear the scoped override; returns the previous one.
std::optional<Backend> set_backend_override(std::optional<Backend> b);

// Whether the fused kernels of a device are ready (NOTE: [backend]).
struct DeviceStatus {
  bool ready = false;
  // Where the kernels come from: "cpu", "metal-metallib", "metal-jit", or
  // "" where there are none.
  std::string path;
  // When not ready: why (what failed, when something did).
  std::string why;
  // The kernels exist but failed to load, build or pass the self-check:
  // something to report.
  bool failed = false;
  SelfCheckResult check; // check.cases == 0: not run
};

// The status of the device of `stream`, found the first time it is asked
// for (which runs the self-check) and the same afterwards.
DeviceStatus device_status(const mlx::core::Stream& stream);

// How the step runs on `stream`.
struct Route {
  bool reference; // run the pure-MLX implementation
  // Why the reference runs though the fused kernels were asked for (empty
  // when it was chosen): the text of the one warning.
  std::string reason;
  // The fused kernels failed: the warning says how to report it.
  bool failed = false;
};

// The end of a message about a failure of the fused kernels.
extern const char* const kReportHint;

// Throws std::runtime_error when `fused` is forced on a stream whose fused
// kernels are not ready.
Route route(const mlx::core::Stream& stream);

// Report `message` once per process (the Python bindings install a handler
// that turns it into a RuntimeWarning; the default prints it).
void warn_once(const std::string& message);
void set_warning_handler(void (*handler)(const std::string&));

} // namespace mlx_fused_adafactor
