#include "cpu/convert.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define AF_HAVE_F16C_PATH 1
#endif
#if defined(__aarch64__)
#include <arm_neon.h>
#define AF_HAVE_NEON_PATH 1
#endif

namespace mlx_fused_adafactor::cpu {

namespace {

void halves_to_floats_scalar(const f16* src, float* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    dst[i] = to_float(src[i]);
  }
}

void floats_to_halves_scalar(const float* src, f16* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    dst[i] = from_float<f16>(src[i]);
  }
}

#if defined(AF_HAVE_F16C_PATH)

bool has_f16c() {
  static const bool yes = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx");
  }();
  return yes;
}

__attribute__((target("avx,f16c"))) void halves_to_floats_f16c(
    const f16* src,
    float* dst,
    int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h =
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
  }
  halves_to_floats_scalar(src + i, dst + i, n - i);
}

__attribute__((target("avx,f16c"))) void floats_to_halves_f16c(
    const float* src,
    f16* dst,
    int64_t n) {
  int64_t i = 0;
  const __m256 inf = _mm256_castsi256_ps(_mm256_set1_epi32(0x7F800000));
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_loadu_ps(src + i);
    // NaN: MLX's pattern (sign | 0x7D00), not the hardware's.
    const __m256 mag = _mm256_and_ps(x, abs_mask);
    if (_mm256_movemask_ps(_mm256_cmp_ps(mag, inf, _CMP_UNORD_Q)) != 0) {
      floats_to_halves_scalar(src + i, dst + i, 8);
      continue;
    }
    _mm_storeu_si128(
        reinterpret_cast<__m128i*>(dst + i),
        _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  floats_to_halves_scalar(src + i, dst + i, n - i);
}

#endif

#if defined(AF_HAVE_NEON_PATH)

void halves_to_floats_neon(const f16* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    const uint16x4_t h = vld1_u16(reinterpret_cast<const uint16_t*>(src + i));
    vst1q_f32(dst + i, vcvt_f32_f16(vreinterpret_f16_u16(h)));
  }
  halves_to_floats_scalar(src + i, dst + i, n - i);
}

void floats_to_halves_neon(const float* src, f16* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    const float32x4_t x = vld1q_f32(src + i);
#if !defined(__ARM_FEATURE_FP16_SCALAR_ARITHMETIC)
    // NaN: MLX's software type's pattern (sign | 0x7D00).
    if (vminvq_u32(vceqq_f32(x, x)) == 0) {
      floats_to_halves_scalar(src + i, dst + i, 4);
      continue;
    }
#endif
    vst1_u16(
        reinterpret_cast<uint16_t*>(dst + i),
        vreinterpret_u16_f16(vcvt_f16_f32(x)));
  }
  floats_to_halves_scalar(src + i, dst + i, n - i);
}

#endif

} // namespace

HalfPath half_path() {
#if defined(AF_HAVE_F16C_PATH)
  if (has_f16c()) {
    return HalfPath::F16C;
  }
#endif
#if defined(AF_HAVE_NEON_PATH)
  return HalfPath::Neon;
#else
  return HalfPath::Scalar;
#endif
}

bool halves_to_floats_by(HalfPath path, const f16* src, float* dst, int64_t n) {
  switch (path) {
    case HalfPath::Scalar:
      halves_to_floats_scalar(src, dst, n);
      return true;
    case HalfPath::F16C:
#if defined(AF_HAVE_F16C_PATH)
      if (has_f16c()) {
        halves_to_floats_f16c(src, dst, n);
        return true;
      }
#endif
      return false;
    case HalfPath::Neon:
#if defined(AF_HAVE_NEON_PATH)
      halves_to_floats_neon(src, dst, n);
      return true;
#else
      return false;
#endif
  }
  return false;
}

bool floats_to_halves_by(HalfPath path, const float* src, f16* dst, int64_t n) {
  switch (path) {
    case HalfPath::Scalar:
      floats_to_halves_scalar(src, dst, n);
      return true;
    case HalfPath::F16C:
#if defined(AF_HAVE_F16C_PATH)
      if (has_f16c()) {
        floats_to_halves_f16c(src, dst, n);
        return true;
      }
#endif
      return false;
    case HalfPath::Neon:
#if defined(AF_HAVE_NEON_PATH)
      floats_to_halves_neon(src, dst, n);
      return true;
#else
      return false;
#endif
  }
  return false;
}

void halves_to_floats(const f16* src, float* dst, int64_t n) {
  static const HalfPath path = half_path();
  halves_to_floats_by(path, src, dst, n);
}

void floats_to_halves(const float* src, f16* dst, int64_t n) {
  static const HalfPath path = half_path();
  floats_to_halves_by(path, src, dst, n);
}

} // namespace mlx_fused_adafactor::cpu
