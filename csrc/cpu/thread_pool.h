// A small persistent thread pool for the CPU path.
//
// MLX runs a CPU primitive on its stream's single thread; an optimizer step
// is memory-bound and needs every core's share of memory bandwidth, so the
// step fans its work items out over this pool. The calling thread takes part,
// so a pool of N threads has N - 1 workers.
//
// Determinism does not depend on scheduling: every work item writes its own
// partial results, and callers combine them in item order.

#pragma once

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace mlx_fused_adafactor::cpu {

class ThreadPool {
 public:
  // The process-wide pool. Its size is MLX_FUSED_ADAFACTOR_NUM_THREADS when
  // set, otherwise the number of hardware threads, capped at kMaxThreads.
  static ThreadPool& instance();

  explicit ThreadPool(int num_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int num_threads() const {
    return static_cast<int>(workers_.size()) + 1;
  }

  // Call fn(i) for i in [0, n), spread over the pool; returns when all are
  // done. Runs inline when n < 2 or `serial` is set.
  void parallel_for(
      size_t n,
      const std::function<void(size_t)>& fn,
      bool serial = false);

  static constexpr int kMaxThreads = 16;

 private:
  void worker_loop();
  void drain();

  std::vector<std::thread> workers_;
  std::mutex run_mutex_; // one job at a time
  std::mutex mutex_;
  std::condition_variable wake_;
  std::condition_variable done_;
  const std::function<void(size_t)>* fn_ = nullptr;
  size_t n_ = 0;
  size_t grain_ = 1;
  std::atomic<size_t> next_{0};
  int busy_ = 0; // workers still inside the current job
  unsigned long generation_ = 0;
  bool stop_ = false;
};

} // namespace mlx_fused_adafactor::cpu
