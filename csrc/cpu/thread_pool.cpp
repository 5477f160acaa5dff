#include "cpu/thread_pool.h"

#include <algorithm>
#include <cstdlib>
#include <string>

namespace mlx_fused_adafactor::cpu {

ThreadPool& ThreadPool::instance() {
  static ThreadPool pool([] {
    int n = static_cast<int>(std::thread::hardware_concurrency());
    if (const char* env = std::getenv("MLX_FUSED_ADAFACTOR_NUM_THREADS")) {
      n = std::atoi(env);
    }
    return std::clamp(n, 1, kMaxThreads);
  }());
  return pool;
}

ThreadPool::ThreadPool(int num_threads) {
  for (int i = 1; i < num_threads; ++i) {
    workers_.emplace_back([this] { worker_loop(); });
  }
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
  }
  wake_.notify_all();
  for (auto& w : workers_) {
    w.join();
  }
}

void ThreadPool::drain() {
  // Items are claimed `grain_` at a time: one atomic per item made a step
  // over a thousand small tensors contend on this cache line.
  const size_t grain = grain_;
  for (size_t i = next_.fetch_add(grain); i < n_; i = next_.fetch_add(grain)) {
    const size_t end = std::min(n_, i + grain);
    for (size_t k = i; k < end; ++k) {
      (*fn_)(k);
    }
  }
}

void ThreadPool::worker_loop() {
  unsigned long seen = 0;
  while (true) {
    {
      std::unique_lock<std::mutex> lock(mutex_);
      wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
      if (stop_) {
        return;
      }
      seen = generation_;
    }
    drain();
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (--busy_ == 0) {
        done_.notify_one();
      }
    }
  }
}

void ThreadPool::parallel_for(
    size_t n,
    const std::function<void(size_t)>& fn,
    bool serial) {
  if (n < 2 || serial || workers_.empty()) {
    for (size_t i = 0; i < n; ++i) {
      fn(i);
    }
    return;
  }
  std::lock_guard<std::mutex> run_lock(run_mutex_);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    fn_ = &fn;
    n_ = n;
    // About 32 claims per thread: small items share a claim, large ones
    // still balance.
    grain_ = std::max<size_t>(1, n / (32 * (workers_.size() + 1)));
    next_.store(0);
    busy_ = static_cast<int>(workers_.size());
    ++generation_;
  }
  wake_.notify_all();
  drain();
  std::unique_lock<std::mutex> lock(mutex_);
  done_.wait(lock, [&] { return busy_ == 0; });
  fn_ = nullptr;
}

} // namespace mlx_fused_adafactor::cpu
