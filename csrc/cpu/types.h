// Storage types of the CPU path and their conversions to and from float.
//
// Bit-for-bit the conversions of MLX's own bfloat16_t and float16_t
// (mlx/types/bf16.h, fp16.h: round to nearest even, MLX's NaN patterns), but
// written without branches or unions so that the compiler vectorizes the
// loops that use them; MLX's struct types keep those loops scalar on x86.
// Where MLX's float16_t is the hardware's __fp16 (arm64 with FP16
// arithmetic), float16 converts as the hardware does.

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

// `a` where `c`, else `b`, without a branch: a branch around float
// arithmetic (which may trap) keeps GCC from vectorizing the loop.
inline uint32_t select_bits(bool c, uint32_t a, uint32_t b) {
  const uint32_t m = 0u - static_cast<uint32_t>(c);
  return (a & m) | (b & ~m);
}

inline float to_float(float x) {
  return x;
}

#if defined(__ARM_FEATURE_FP16_SCALAR_ARITHMETIC)
// MLX's float16_t is the hardware's __fp16 here: convert as it does.
inline float to_float(f16 x) {
  __fp16 h;
  std::memcpy(&h, &x.bits, sizeof(h));
  return h;
}
#endif

inline float to_float(bf16 x) {
  return bits_f32(static_cast<uint32_t>(x.bits) << 16);
}

#if !defined(__ARM_FEATURE_FP16_SCALAR_ARITHMETIC)
inline float to_float(f16 x) {
  const uint32_t w = static_cast<uint32_t>(x.bits) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  // Normal: rebias the exponent, then scale by 2^-112.
  const float normal = bits_f32((two_w >> 4) + (0xE0u << 23)) * bits_f32(0x7800000u);
  // Subnormal: the mantissa under a magic exponent, minus the magic bias.
  const float subnormal = bits_f32((two_w >> 17) | (126u << 23)) - 0.5f;
  return bits_f32(
      sign |
      select_bits(two_w < (1u << 27), f32_bits(subnormal), f32_bits(normal)));
}
#endif

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

#if defined(__ARM_FEATURE_FP16_SCALAR_ARITHMETIC)
template <>
inline f16 from_float<f16>(float v) {
  const __fp16 h = static_cast<__fp16>(v);
  f16 out;
  std::memcpy(&out.bits, &h, sizeof(h));
  return out;
}
#else
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
  return f16{static_cast<uint16_t>(sign | select_bits(nan, 0x7D00u, bits))};
}
#endif

} // namespace mlx_fused_adafactor::cpu
