// Reuse of the eager step's output buffers (NOTE: [eager step]).
//
// MLX's CPU allocator caches at most 32 MB of freed buffers by default and
// returns larger ones to the system, so every step of a large model would
// page-fault its way through fresh pages, which on a 2-core machine costs
// more than the step's arithmetic. The eager step takes its outputs from this
// cache instead: buffers come from MLX's allocator, and when the array that
// owns one dies (the previous step's parameters and state) it comes back here
// and the next step reuses it. The cache holds at most as many bytes as the
// largest step wrote, so it never exceeds one step's outputs.

#pragma once

#include <cstddef>
#include <unordered_map>
#include <mutex>
#include <vector>

#include "mlx/allocator.h"

namespace mlx_fused_adafactor::cpu {

class BufferCache {
 public:
  static BufferCache& instance();

  // Data of `bytes` bytes whose buffer returns to this cache when freed.
  mlx::core::allocator::Data acquire(size_t bytes);
  // Take a buffer back; kept for reuse while under the limit.
  void release(mlx::core::allocator::Buffer buffer, size_t bytes);
  // Let the cache hold up to `bytes` (the limit only grows).
  void reserve(size_t bytes);
  // Free every cached buffer.
  void clear();
  size_t cached_bytes();

 private:
  std::mutex mutex_;
  // Free buffers by size; a step asks for the sizes it freed.
  std::unordered_map<size_t, std::vector<mlx::core::allocator::Buffer>> free_;
  size_t cached_ = 0;
  size_t limit_ = 0;
};

} // namespace mlx_fused_adafactor::cpu
