#include "op/backend.h"

#include <cstdlib>
#include <iostream>
#include <mutex>
#include <set>
#include <stdexcept>

#include "metal/metal.h"

namespace mlx_fused_adafactor {

namespace {

constexpr const char* kVariable = "MLX_FUSED_ADAFACTOR_BACKEND";

std::mutex override_mutex;
std::optional<Backend> override_backend;

void print_warning(const std::string& message) {
  std::cerr << "warning: " << message << std::endl;
}

std::mutex warn_mutex;
void (*warning_handler)(const std::string&) = print_warning;

} // namespace

const char* backend_name(Backend b) {
  switch (b) {
    case Backend::Auto:
      return "auto";
    case Backend::Fused:
      return "fused";
    case Backend::Reference:
      return "reference";
  }
  return "";
}

Backend parse_backend(const std::string& value) {
  for (Backend b : {Backend::Auto, Backend::Fused, Backend::Reference}) {
    if (value == backend_name(b)) {
      return b;
    }
  }
  throw std::invalid_argument(
      std::string("[adafactor] ") + kVariable + "='" + value +
      "' is not a backend; use auto, fused or reference.");
}

Backend current_backend() {
  {
    std::lock_guard<std::mutex> lock(override_mutex);
    if (override_backend) {
      return *override_backend;
    }
  }
  static const Backend from_env = [] {
    const char* env = std::getenv(kVariable);
    return env && *env ? parse_backend(env) : Backend::Auto;
  }();
  return from_env;
}

std::optional<Backend> set_backend_override(std::optional<Backend> b) {
  std::lock_guard<std::mutex> lock(override_mutex);
  std::swap(override_backend, b);
  return b;
}

Route route(const mlx::core::Stream& stream) {
  const Backend backend = current_backend();
  if (backend == Backend::Reference) {
    return {true, ""};
  }
  if (stream.device == mlx::core::Device::cpu) {
    return {false, ""};
  }
  std::string why;
  if (metal::kernels_ready(stream, why)) {
    return {false, ""};
  }
  if (backend == Backend::Fused) {
    throw std::runtime_error(
        std::string("[adafactor] ") + kVariable + "=fused, but " + why);
  }
  return {true, why};
}

void warn_once(const std::string& message) {
  void (*handler)(const std::string&);
  {
    std::lock_guard<std::mutex> lock(warn_mutex);
    static std::set<std::string> seen;
    if (!seen.insert(message).second) {
      return;
    }
    handler = warning_handler;
  }
  handler(message);
}

void set_warning_handler(void (*handler)(const std::string&)) {
  std::lock_guard<std::mutex> lock(warn_mutex);
  warning_handler = handler ? handler : print_warning;
}

} // namespace mlx_fused_adafactor
