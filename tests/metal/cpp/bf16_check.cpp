// The kernels' bfloat16 conversions (kernels/adafactor_math.h, NOTE:
// [bfloat16 storage]) against the CPU path's (csrc/cpu/types.h, which
// tests/cpp/conversions.cpp checks against MLX's bfloat16_t): every 16-bit
// pattern to float, and from float every pattern of the upper 16 bits with
// the lower 16 bits at ties, carries and a few others. Prints the mismatch
// count; exits non-zero on any.

#include <cstdio>

#include "adafactor_math.h"
#include "cpu/types.h"

using namespace mlx_fused_adafactor::cpu;

int main() {
  long bad = 0;
  for (uint32_t b = 0; b < 65536; ++b) {
    const uint16_t bits = static_cast<uint16_t>(b);
    const uint32_t ours = af_float_bits(af_bf16_to_float(bits));
    const uint32_t cpu = f32_bits(to_float(bf16{bits}));
    if (ours != cpu && bad++ < 10) {
      std::printf("to float %04x: kernels %08x, cpu %08x\n", b, ours, cpu);
    }
  }
  const uint32_t low[] = {0x0000, 0x0001, 0x1234, 0x7FFF, 0x8000,
                          0x8001, 0xABCD, 0xFFFE, 0xFFFF};
  for (uint32_t hi = 0; hi < 65536; ++hi) {
    for (uint32_t lo : low) {
      const float f = af_bits_float((hi << 16) | lo);
      const uint16_t ours = af_float_to_bf16(f);
      const uint16_t cpu = from_float<bf16>(f).bits;
      if (ours != cpu && bad++ < 20) {
        std::printf("from float %08x: kernels %04x, cpu %04x\n",
                    (hi << 16) | lo, ours, cpu);
      }
    }
  }
  std::printf("mismatches: %ld\n", bad);
  return bad != 0;
}
