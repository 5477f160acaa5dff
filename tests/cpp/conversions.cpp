// Checks that the CPU path's float16/bfloat16 conversions are bit-identical
// to MLX's own types: every 16-bit pattern to float, and float to 16 bits
// over random and edge-case floats. Both the element conversions of
// csrc/cpu/types.h and the block conversions of csrc/cpu/convert.h
// (NOTE: [float16 blocks]), by every path this machine has (scalar, F16C,
// NEON). Prints the paths checked and the mismatch count, and exits
// non-zero on any mismatch.

#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <vector>

#include "mlx/types/half_types.h"

#include "cpu/convert.h"
#include "cpu/types.h"

using namespace mlx_fused_adafactor::cpu;

int main() {
  long bad = 0;
  auto report = [&](const char* what, uint32_t in, uint32_t want, uint32_t got) {
    if (bad++ < 10) {
      std::printf("%s %08x: mlx %08x, ours %08x\n", what, in, want, got);
    }
  };
  // Every 16-bit pattern to float.
  for (uint32_t b = 0; b < 65536; ++b) {
    uint16_t bits = static_cast<uint16_t>(b);
    mlx::core::float16_t h;
    mlx::core::bfloat16_t g;
    std::memcpy(&h, &bits, 2);
    std::memcpy(&g, &bits, 2);
    float hf = static_cast<float>(h), ours_h = to_float(f16{bits});
    if (f32_bits(hf) != f32_bits(ours_h) && !(std::isnan(hf) && std::isnan(ours_h))) {
      report("f16->f32", b, f32_bits(hf), f32_bits(ours_h));
    }
    float gf = static_cast<float>(g), ours_g = to_float(bf16{bits});
    if (f32_bits(gf) != f32_bits(ours_g)) {
      report("bf16->f32", b, f32_bits(gf), f32_bits(ours_g));
    }
  }
  // Floats to 16 bits: edge cases, then random bit patterns biased towards
  // half's range (subnormals, rounding ties, overflow to inf).
  std::vector<float> xs = {0.0f, -0.0f, 1.0f, 65504.0f, 65520.0f, 1e-8f,
                           std::numeric_limits<float>::infinity(),
                           -std::numeric_limits<float>::infinity(),
                           std::numeric_limits<float>::quiet_NaN(),
                           std::numeric_limits<float>::denorm_min()};
  std::mt19937 rng(1234);
  for (int i = 0; i < 4000000; ++i) {
    uint32_t u = rng();
    if (i % 2) {
      u = (u & 0x80000000u) | ((u & 0x0FFFFFFFu) + 0x30000000u);
    }
    xs.push_back(bits_f32(u));
  }
  for (float f : xs) {
    mlx::core::float16_t h(f);
    mlx::core::bfloat16_t g(f);
    uint16_t hb, gb;
    std::memcpy(&hb, &h, 2);
    std::memcpy(&gb, &g, 2);
    if (hb != from_float<f16>(f).bits) {
      report("f32->f16", f32_bits(f), hb, from_float<f16>(f).bits);
    }
    if (gb != from_float<bf16>(f).bits) {
      report("f32->bf16", f32_bits(f), gb, from_float<bf16>(f).bits);
    }
  }
  // Block conversions, by each path, over the same inputs; odd lengths so
  // that every path runs its vector body and its tail.
  std::vector<f16> halves(65536 + 5);
  for (size_t b = 0; b < halves.size(); ++b) {
    halves[b] = f16{static_cast<uint16_t>(b & 0xFFFF)};
  }
  std::vector<float> got(halves.size());
  std::vector<f16> got_halves(xs.size());
  const struct {
    HalfPath path;
    const char* name;
  } paths[] = {
      {HalfPath::Scalar, "scalar"},
      {HalfPath::F16C, "f16c"},
      {HalfPath::Neon, "neon"}};
  for (const auto& p : paths) {
    if (!halves_to_floats_by(p.path, halves.data(), got.data(), halves.size())) {
      std::printf("path %s: not on this machine\n", p.name);
      continue;
    }
    for (size_t b = 0; b < halves.size(); ++b) {
      mlx::core::float16_t h;
      std::memcpy(&h, &halves[b].bits, 2);
      const float want = static_cast<float>(h);
      if (f32_bits(want) != f32_bits(got[b]) &&
          !(std::isnan(want) && std::isnan(got[b]))) {
        report(p.name, halves[b].bits, f32_bits(want), f32_bits(got[b]));
      }
    }
    floats_to_halves_by(p.path, xs.data(), got_halves.data(), xs.size() - 3);
    for (size_t i = 0; i + 3 < xs.size(); ++i) {
      mlx::core::float16_t h(xs[i]);
      uint16_t want;
      std::memcpy(&want, &h, 2);
      if (want != got_halves[i].bits) {
        report(p.name, f32_bits(xs[i]), want, got_halves[i].bits);
      }
    }
    std::printf("path %s: checked%s\n", p.name,
                p.path == half_path() ? " (the one the step takes)" : "");
  }
  std::printf("mismatches: %ld\n", bad);
  return bad == 0 ? 0 : 1;
}
