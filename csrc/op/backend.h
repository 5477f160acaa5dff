// Which implementation runs the step on a stream.
//
// NOTE: [backend]
// MLX_FUSED_ADAFACTOR_BACKEND chooses for the process: `auto` (default),
// `fused` or `reference`; `with mlx_fused_adafactor.backend(...)` overrides
// it for a scope. The choice is made per stream when the step is built, as
// MLX's fast ops do in use_fallback(stream):
//   reference  the pure-MLX implementation (NOTE: [reference]) everywhere;
//   fused      the fused kernels, or an error where there are none;
//   auto       the fused kernels where there are any, else the reference
//              with one warning that says why.
// The fused kernels exist on the CPU and, in Metal builds, on Apple GPUs.

#pragma once

#include <optional>
#include <string>

#include "mlx/stream.h"

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

// How the step runs on `stream`.
struct Route {
  bool reference; // run the pure-MLX implementation
  // Why the reference runs though the fused kernels were asked for (empty
  // when it was chosen): the text of the one warning.
  std::string reason;
};

// Throws std::runtime_error when `fused` is forced on a stream without
// fused kernels.
Route route(const mlx::core::Stream& stream);

// Report `message` once per process (the Python bindings install a handler
// that turns it into a RuntimeWarning; the default prints it).
void warn_once(const std::string& message);
void set_warning_handler(void (*handler)(const std::string&));

} // namespace mlx_fused_adafactor
