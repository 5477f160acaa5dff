#include "op/backend.h"

#include <cstdlib>
#include <iostream>
#include <map>
#include <mutex>
#include <set>
#include <stdexcept>

#include "cpu/faults.h"
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

const char* device_name(const mlx::core::Device& d) {
  return d == mlx::core::Device::cpu ? "cpu" : "gpu";
}

DeviceStatus find_status(const mlx::core::Stream& s) {
  DeviceStatus st;
  if (s.device == mlx::core::Device::cpu) {
    st.path = "cpu";
  } else {
    const metal::KernelLibrary lib = metal::prepare_kernels(s);
    st.path = lib.path;
    if (!lib.ready) {
      st.why = lib.why;
      st.failed = metal::has_kernels();
      return st;
    }
  }
#if defined(AF_FAULTS)
  // NOTE: [fault switch]: fault builds only.
  if (cpu::self_check_off()) {
    st.check.passed = true;
    st.ready = true;
    return st;
  }
#endif
  st.check = self_check(s);
  st.ready = st.check.passed;
  if (!st.ready) {
    st.failed = true;
    st.why = std::string("the fused kernels on the ") + device_name(s.device) +
        " failed their self-check against the reference implementation (" +
        st.check.failure + ")";
  }
  return st;
}

} // namespace

const char* const kReportHint =
    ". Please report it with the output of "
    "`python -m mlx_fused_adafactor.check --json`.";

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

DeviceStatus device_status(const mlx::core::Stream& stream) {
  static std::mutex mutex;
  static std::map<std::pair<int, int>, DeviceStatus> found;
  // Held while the first caller checks: the others wait for its answer.
  std::lock_guard<std::mutex> lock(mutex);
  const std::pair<int, int> key{
      static_cast<int>(stream.device.type), stream.device.index};
  auto it = found.find(key);
  if (it == found.end()) {
    it = found.emplace(key, find_status(stream)).first;
  }
  return it->second;
}

Route route(const mlx::core::Stream& stream) {
  const Backend backend = current_backend();
  if (backend == Backend::Reference) {
    return {true, ""};
  }
  const DeviceStatus st = device_status(stream);
  if (st.ready) {
    return {false, "", false};
  }
  if (backend == Backend::Fused) {
    throw std::runtime_error(
        std::string("[adafactor] ") + kVariable + "=fused, but " + st.why +
        (st.failed ? kReportHint : ""));
  }
  return {true, st.why, st.failed};
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
