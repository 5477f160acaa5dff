#include "cpu/buffer_cache.h"

#include <cstdlib>

namespace mlx_fused_adafactor::cpu {

namespace alloc = mlx::core::allocator;

BufferCache& BufferCache::instance() {
  // Never destroyed: arrays may return buffers during interpreter shutdown.
  static BufferCache* cache = new BufferCache();
  return *cache;
}

alloc::Data BufferCache::acquire(size_t bytes) {
  alloc::Buffer buffer(nullptr);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = free_.find(bytes);
    if (it != free_.end() && !it->second.empty()) {
      buffer = it->second.back();
      it->second.pop_back();
      cached_ -= bytes;
    }
  }
  if (buffer.ptr() == nullptr) {
    buffer = alloc::allocator().malloc(bytes);
  }
  return alloc::Data(buffer, [bytes](alloc::Buffer b) {
    BufferCache::instance().release(b, bytes);
  });
}

void BufferCache::release(alloc::Buffer buffer, size_t bytes) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (cached_ + bytes <= limit_) {
      free_[bytes].push_back(buffer);
      cached_ += bytes;
      return;
    }
  }
  alloc::allocator().free(buffer);
}

void BufferCache::reserve(size_t bytes) {
  static const bool enabled = [] {
    const char* env = std::getenv("MLX_FUSED_ADAFACTOR_BUFFER_CACHE");
    return !(env && env[0] == '0');
  }();
  std::lock_guard<std::mutex> lock(mutex_);
  if (enabled && bytes > limit_) {
    limit_ = bytes;
  }
}

void BufferCache::clear() {
  std::unordered_map<size_t, std::vector<alloc::Buffer>> old;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    old.swap(free_);
    cached_ = 0;
  }
  for (auto& [bytes, buffers] : old) {
    for (auto& buffer : buffers) {
      alloc::allocator().free(buffer);
    }
  }
}

size_t BufferCache::cached_bytes() {
  std::lock_guard<std::mutex> lock(mutex_);
  return cached_;
}

} // namespace mlx_fused_adafactor::cpu
