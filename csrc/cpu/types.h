// Storage types of the CPU path and their conversions to and from float.
//
// Bit-for-bit the conversions of MLX's own bfloat16_t and float16_t
// (mlx/types/bf16.h, fp16.h: round to nearest even, MLX's NaN patterns), but
// written without branches or unions so that the compiler vectorizes the
// loops that use them; MLX's struct types keep those loops scalar on x86.

#pragma once

#include <cstdint>
#include <cstring>

namespace mlx_fused_adafactor::cpu {

struct bf16 {
  uint16_t bits;
};
struct f16 {
  uint16_t bits;
};

inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

inline float bits_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline float to_float(float x) {
  return x;
}

inline float to_float(bf16 x) {
  return bits_f32(static_cast<uint32_t>(x.bits) << 16);
}

inline float to_float(f16 x) {
  const uint32_t w = static_cast<uint32_t>(x.bits) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  // Normal: rebias the exponent, then scale by 2^-112.
  const float normal = bits_f32((two_w >> 4) + (0xE0u << 23)) * bits_f32(0x7800000u);
  // Subnormal: the mantissa under a magic exponent, minus the magic bias.
  const float subnormal = bits_f32((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t mag = two_w < (1u << 27) ? f32_bits(subnormal) : f32_bits(normal);
  return bits_f32(sign | mag);
}

template <typename T>
inline T from_float(float v);

template <>
inline float from_float<float>(float v) {
  return v;
}

template <>
inline bf16 from_float<bf16>(float v) {
  const uint32_t u = f32_bits(v);
  const uint32_t rounded = (u + ((u >> 16) & 1u) + 0x7FFFu) >> 16;
  const bool nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  return bf16{static_cast<uint16_t>(nan ? 0x7FC0u : rounded)};
}

template <>
inline f16 from_float<f16>(float v) {
  const uint32_t u = f32_bits(v);
  const uint32_t sign = (u & 0x80000000u) >> 16;
  uint32_t expo = u & 0x7F800000u;
  expo = expo < 0x38800000u ? 0x38800000u : expo;
  expo += 15u << 23;
  // Scale into half's range and let the addition round to nearest even.
  const float mag = bits_f32(u & 0x7FFFFFFFu);
  const float magic =
      bits_f32(expo) + (mag * bits_f32(0x77800000u)) * bits_f32(0x08800000u);
  const uint32_t m = f32_bits(magic);
  const uint32_t bits = ((m >> 13) & 0x7C00u) + (m & 0x0FFFu);
  const bool nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  return f16{static_cast<uint16_t>(sign | (nan ? 0x7D00u : bits))};
}

} // namespace mlx_fused_adafactor::cpu
