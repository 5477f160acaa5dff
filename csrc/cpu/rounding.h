// Stochastic rounding on the CPU path (NOTE: [stochastic rounding]).
//
// Bit for bit adafactor_round_bf16 and adafactor_round_f16 of
// kernels/adafactor_math.h, written without branches: both sides of each
// choice are computed and the result selected by bit masks. The shared
// functions return early for special values and branch on the binade,
// which keeps pass 3's loops scalar (GCC does not if-convert float
// arithmetic that may trap). tests/cpp/stochastic.cpp compares the two
// over every binade, the boundaries and random draws.

#pragma once

#include <cstdint>

#include "cpu/types.h"

namespace mlx_fused_adafactor::cpu {

// adafactor_round_bf16(v, bits).
inline float round_bf16_stochastic(float v, uint32_t bits) {
  const uint32_t u = f32_bits(v);
  const uint32_t up = (u + (bits & 0xFFFFu)) & 0xFFFF0000u;
  // Never past the largest finite value.
  const uint32_t r =
      select_bits((up & 0x7F800000u) == 0x7F800000u, u & 0xFFFF0000u, up);
  // NaN, Inf and values that round to Inf: as they are.
  return bits_f32(select_bits((u & 0x7FFFFFFFu) >= 0x7F7F8000u, u, r));
}

// adafactor_round_f16(v, bits).
inline float round_f16_stochastic(float v, uint32_t bits) {
  const uint32_t u = f32_bits(v);
  const uint32_t mag = u & 0x7FFFFFFFu;
  const float a = bits_f32(mag);
  // Normal in float16 (>= 2^-14): 10 fraction bits.
  const bool normal = mag >= 0x38800000u;
  const uint32_t lo_normal = mag & 0xFFFFE000u;
  const uint32_t spacing_normal = (mag & 0x7F800000u) - (10u << 23);
  // Subnormal in float16: multiples of 2^-24 (the input clamped to the
  // subnormal range, where the lanes that use it already are). The integer
  // conversions go through int32, which vectorizes and, below 2^24, gives
  // what the unsigned ones give.
  const float spacing_sub = 1.0f / 16777216.0f;
  const float a_sub = bits_f32(select_bits(normal, 0x38800000u, mag));
  const float lo_sub =
      static_cast<float>(static_cast<int32_t>(a_sub * 16777216.0f)) *
      spacing_sub;
  const float lo = bits_f32(select_bits(normal, lo_normal, f32_bits(lo_sub)));
  const float spacing =
      bits_f32(select_bits(normal, spacing_normal, f32_bits(spacing_sub)));
  const float frac = (a - lo) / spacing;
  const float draw = static_cast<float>(static_cast<int32_t>(bits >> 8)) *
      (1.0f / 16777216.0f);
  const float hi = lo + spacing;
  uint32_t r = select_bits(draw < frac, f32_bits(hi), f32_bits(lo));
  // Never past the largest finite value.
  r = select_bits(bits_f32(r) > 65504.0f, f32_bits(lo), r);
  r |= u & 0x80000000u;
  // NaN, Inf and values that round to Inf (>= 65520): as they are.
  return bits_f32(select_bits(mag >= 0x477FF000u, u, r));
}

} // namespace mlx_fused_adafactor::cpu
