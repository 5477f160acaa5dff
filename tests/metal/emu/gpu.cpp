// The emulator's GPU: the kernels of the rewritten .metal sources register
// here, and launch() runs a dispatch's threadgroups one after another, each
// with one OS thread per GPU thread (emu_runtime.h).

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <map>
#include <set>
#include <string>
#include <thread>
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
  std::cerr << "emu_runner: " << msg << std::endl;
  std::exit(3);
}

namespace {

void run_dispatch(
    const std::string& name,
    const KernelInfo& k,
    uint3 grid,
    uint3 size,
    std::vector<void*> buffers) {
  Group g;
  g.buffers = std::move(buffers);
  g.grid = grid;
  g.size = size;
  const int n = int(size.x * size.y * size.z);
  if (n <= 0 || n > 1024) {
    fail(name + ": bad threadgroup size");
  }
  g.barrier.reset(n);
  g.simdgroups = std::vector<Simdgroup>((n + 31) / 32);
  for (int s = 0; s < int(g.simdgroups.size()); ++s) {
    g.simdgroups[s].size = std::min(32, n - 32 * s);
    g.simdgroups[s].barrier.reset(g.simdgroups[s].size);
  }
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
      for (uint z = 0; z < grid.z; ++z) {
        for (uint y = 0; y < grid.y; ++y) {
          for (uint x = 0; x < grid.x; ++x) {
            t.tgid = {x, y, z};
            k.fn(g);
            // The next group reuses threadgroup storage.
            g.barrier.wait();
          }
        }
      }
      current = nullptr;
    });
  }
  for (auto& th : threads) {
    th.join();
  }
}

} // namespace

void launch(const Launch& l) {
  auto it = registry().find(l.kernel);
  if (it == registry().end()) {
    fail("no kernel named " + l.kernel);
  }
  std::vector<void*> bound(64, nullptr);
  std::set<int> indices;
  for (const auto& [idx, ptr] : l.buffers) {
    if (idx < 0 || idx >= 64 || !indices.insert(idx).second) {
      fail(l.kernel + ": bad binding");
    }
    bound[idx] = ptr;
  }
  // The plan binds exactly the buffers the kernel declares.
  std::set<int> declared(it->second.buffers.begin(), it->second.buffers.end());
  if (declared != indices) {
    std::string msg = l.kernel + ": bound buffers differ from declared ones:";
    for (int d : declared) {
      msg += indices.count(d) ? "" : " missing " + std::to_string(d);
    }
    for (int d : indices) {
      msg += declared.count(d) ? "" : " extra " + std::to_string(d);
    }
    fail(msg);
  }
  run_dispatch(
      l.kernel,
      it->second,
      {l.grid[0], l.grid[1], l.grid[2]},
      {l.group[0], l.group[1], l.group[2]},
      bound);
}

std::vector<std::pair<std::string, std::vector<int>>> registered_kernels() {
  std::vector<std::pair<std::string, std::vector<int>>> out;
  for (auto& [name, k] : registry()) {
    out.emplace_back(name, k.buffers);
  }
  return out;
}

} // namespace emu
