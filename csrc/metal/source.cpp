// The kernel library's sources (NOTE: [kernel library] in host.cpp), on
// every platform: the embedded source, and the .metallib next to the
// extension when the build made one.

#include "metal/metal.h"

#include <dlfcn.h>

#include <filesystem>
#include <stdexcept>

#include "kernel_source.h"
#include "metal/plan.h"

namespace mlx_fused_adafactor::metal {

std::string_view kernel_source() {
  return {embedded::kSource, sizeof(embedded::kSource) - 1};
}

const char* kernel_source_sha256() {
  return embedded::kSourceSha256;
}

std::string extension_dir() {
  static const std::string dir = [] {
    Dl_info info;
    if (!dladdr(reinterpret_cast<void*>(&extension_dir), &info) ||
        !info.dli_fname) {
      throw std::runtime_error("[adafactor] cannot locate the extension.");
    }
    return std::filesystem::path(info.dli_fname).parent_path().string();
  }();
  return dir;
}

std::string metallib_path() {
  const auto path =
      std::filesystem::path(extension_dir()) / (std::string(kLibraryName) + ".metallib");
  std::error_code ec;
  return std::filesystem::is_regular_file(path, ec) ? path.string() : "";
}

} // namespace mlx_fused_adafactor::metal
