// Checks that the CPU path's branch-free float16/bfloat16 conversions
// (csrc/cpu/types.h) are bit-identical to MLX's own types: every 16-bit
// pattern to float, and float to 16 bits over random and edge-case floats.
// Prints the mismatch count and exits non-zero on any mismatch.

#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <vector>

#include "mlx/types/half_types.h"

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
  std::printf("mismatches: %ld\n", bad);
  return bad == 0 ? 0 : 1;
}
