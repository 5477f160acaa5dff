// Checks that the CPU path's branch-free stochastic rounding
// (csrc/cpu/rounding.h) is bit-identical to the shared functions of
// kernels/adafactor_math.h (NOTE: [stochastic rounding]): for both signs,
// every float32 exponent with mantissas at and around the float16/bfloat16
// rounding boundaries, the special values, and random floats, each with
// random bits and with the extreme draws. Prints the mismatch count and
// exits non-zero on any mismatch.

#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "adafactor_math.h"
#include "cpu/rounding.h"

using namespace mlx_fused_adafactor::cpu;

int main() {
  long bad = 0;
  long checked = 0;
  auto check = [&](uint32_t u, uint32_t bits) {
    const float v = bits_f32(u);
    const uint32_t want_b = f32_bits(adafactor_round_bf16(v, bits));
    const uint32_t got_b = f32_bits(round_bf16_stochastic(v, bits));
    const uint32_t want_h = f32_bits(adafactor_round_f16(v, bits));
    const uint32_t got_h = f32_bits(round_f16_stochastic(v, bits));
    ++checked;
    if (want_b != got_b && bad++ < 10) {
      std::printf("bf16 %08x bits %08x: shared %08x, cpu %08x\n", u, bits,
                  want_b, got_b);
    }
    if (want_h != got_h && bad++ < 10) {
      std::printf("f16 %08x bits %08x: shared %08x, cpu %08x\n", u, bits,
                  want_h, got_h);
    }
  };
  std::mt19937 rng(20260101);
  const uint32_t draws[] = {0u, 1u, 0xFFu, 0x100u, 0x7FFFu, 0x8000u,
                            0xFFFFu, 0x10000u, 0x7FFFFFFFu, 0x80000000u,
                            0xFFFFFF00u, 0xFFFFFFFFu};
  // Mantissas at and next to the boundaries of both grids.
  const uint32_t mantissas[] = {0x000000u, 0x000001u, 0x000FFFu, 0x001000u,
                                0x001FFFu, 0x002000u, 0x007FFFu, 0x008000u,
                                0x00FFFFu, 0x010000u, 0x3FFFFFu, 0x400000u,
                                0x7FDFFFu, 0x7FE000u, 0x7FEFFFu, 0x7FF000u,
                                0x7F7FFFu, 0x7F8000u, 0x7FFFFFu};
  for (uint32_t sign = 0; sign < 2; ++sign) {
    for (uint32_t e = 0; e < 256; ++e) {
      for (uint32_t m : mantissas) {
        const uint32_t u = (sign << 31) | (e << 23) | m;
        for (uint32_t b : draws) {
          check(u, b);
        }
        for (int k = 0; k < 64; ++k) {
          check(u, rng());
        }
      }
      for (int k = 0; k < 4096; ++k) {
        check((sign << 31) | (e << 23) | (rng() & 0x7FFFFFu), rng());
      }
    }
  }
  for (int k = 0; k < 4000000; ++k) {
    check(rng(), rng());
  }
  std::printf("checked: %ld\nmismatches: %ld\n", checked, bad);
  return bad == 0 ? 0 : 1;
}
