// The emulator's GPU: the kernels of the rewritten kernel source register
// here, and run_segment() runs dispatches, each threadgroup with one OS
// thread per GPU thread (emu_runtime.h), the dispatches of a segment one
// after another in some order or all at once. A watchdog thread ends the
// process when a dispatch runs too long, naming the kernel and the
// threadgroup it was in.

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <unistd.h>
#include <vector>

#include <metal_stdlib>

#include "emu.h"

// The runner's own code uses the standard library's names.
#undef device
#undef constant
#undef threadgroup
#undef thread

namespace emu {

std::map<std::string, KernelInfo>& registry() {
  static std::map<std::string, KernelInfo> r;
  return r;
}

void register_kernel(const char* name, KernelInfo info) {
  registry()[name] = info;
}

void fail(const std::string& msg) {
  std::fprintf(stderr, "emu_runner: %s\n", msg.c_str());
  std::fflush(stderr);
  // Other threads may be blocked in a barrier: leave without unwinding.
  _exit(3);
}

Declared declared(const std::string& name) {
  auto it = registry().find(name);
  if (it == registry().end()) {
    fail("no kernel named " + name);
  }
  return {it->second.buffers, it->second.threadgroup_bytes};
}

std::vector<std::pair<std::string, std::vector<int>>> registered_kernels() {
  std::vector<std::pair<std::string, std::vector<int>>> out;
  for (auto& [name, k] : registry()) {
    out.emplace_back(name, k.buffers);
  }
  return out;
}

namespace {

// Dispatches being run, watched by one thread.
class Watchdog {
 public:
  static Watchdog& instance() {
    static Watchdog* w = new Watchdog();
    return *w;
  }
  void add(const Group* g) {
    std::lock_guard<std::mutex> lock(mutex_);
    running_[g] = std::chrono::steady_clock::now();
  }
  void remove(const Group* g) {
    std::lock_guard<std::mutex> lock(mutex_);
    running_.erase(g);
  }

 private:
  Watchdog() {
    const char* env = std::getenv("EMU_WATCHDOG_SECONDS");
    limit_ = std::chrono::duration<double>(env ? std::atof(env) : 120.0);
    std::thread([this] { watch(); }).detach();
  }
  void watch() {
    for (;;) {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      std::lock_guard<std::mutex> lock(mutex_);
      const auto now = std::chrono::steady_clock::now();
      for (const auto& [g, start] : running_) {
        if (now - start > limit_) {
          fail("watchdog: " + g->kernel + " did not finish within " +
               std::to_string(static_cast<int>(limit_.count())) +
               " s; it was running threadgroup " + g->position() +
               " of a grid of (" + std::to_string(g->grid.x) + ", " +
               std::to_string(g->grid.y) + ", " + std::to_string(g->grid.z) +
               ")");
        }
      }
    }
  }

  std::mutex mutex_;
  std::map<const Group*, std::chrono::steady_clock::time_point> running_;
  std::chrono::duration<double> limit_;
};

// Run one dispatch to completion: its threadgroups one after another, the
// threads of each concurrently.
void run_dispatch(const Launch& l) {
  auto it = registry().find(l.kernel);
  if (it == registry().end()) {
    fail("no kernel named " + l.kernel);
  }
  const KernelInfo& k = it->second;
  Group g;
  g.kernel = l.kernel;
  g.buffers.assign(64, nullptr);
  for (const auto& [idx, ptr] : l.buffers) {
    g.buffers[idx] = ptr;
  }
  g.grid = {l.grid[0], l.grid[1], l.grid[2]};
  g.size = {l.group[0], l.group[1], l.group[2]};
  const uint3 grid = g.grid;
  const uint3 size = g.size;
  const int n = int(size.x * size.y * size.z);
  g.barrier.reset(n, "thread");
  g.next.reset(n, "thread");
  g.simdgroups = std::vector<Simdgroup>((n + 31) / 32);
  for (int s = 0; s < int(g.simdgroups.size()); ++s) {
    g.simdgroups[s].size = std::min(32, n - 32 * s);
    g.simdgroups[s].barrier.reset(g.simdgroups[s].size, "lane");
  }
  const uint64_t groups = uint64_t(grid.x) * grid.y * grid.z;
  Watchdog::instance().add(&g);
  std::vector<std::thread> threads;
  threads.reserve(n);
  for (int lid = 0; lid < n; ++lid) {
    threads.emplace_back([&, lid] {
      Thread t;
      t.group = &g;
      t.lid = uint(lid);
      t.lpos = {uint(lid) % size.x, (uint(lid) / size.x) % size.y,
                uint(lid) / (size.x * size.y)};
      current = &t;
      const Site next{"the next threadgroup", "", 0};
      for (uint64_t r = 0; r < groups; ++r) {
        t.tgid = {uint(r % grid.x), uint((r / grid.x) % grid.y),
                  uint(r / (uint64_t(grid.x) * grid.y))};
        k.fn(g);
        // Every thread is past the kernel: drop its threadgroup storage.
        if (lid == 0) {
          std::lock_guard<std::mutex> lock(g.shared_mutex);
          g.shared.clear();
          g.running.store(r + 1, std::memory_order_relaxed);
        }
        g.next.wait(lid, next, &g, -1);
      }
      current = nullptr;
    });
  }
  for (auto& th : threads) {
    th.join();
  }
  Watchdog::instance().remove(&g);
}

} // namespace

void run_segment(const std::vector<Launch>& launches, Order order,
                 uint64_t seed) {
  std::vector<const Launch*> run;
  for (const auto& l : launches) {
    run.push_back(&l);
  }
  switch (order) {
    case Order::Plan:
      break;
    case Order::Reverse:
      std::reverse(run.begin(), run.end());
      break;
    case Order::Shuffle: {
      std::mt19937_64 rng(seed);
      std::shuffle(run.begin(), run.end(), rng);
      break;
    }
    case Order::Concurrent: {
      std::vector<std::thread> all;
      for (const Launch* l : run) {
        all.emplace_back([l] { run_dispatch(*l); });
      }
      for (auto& th : all) {
        th.join();
      }
      return;
    }
  }
  for (const Launch* l : run) {
    run_dispatch(*l);
  }
}

} // namespace emu
