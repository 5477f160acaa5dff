// Adafactor per-element and per-tensor math, shared by the Metal kernels and
// the CPU path so the two cannot drift.
//
// Compiles as Metal Shading Language (when __METAL__ is defined) and as C++17.
// Everything here is fp32 arithmetic, whatever the storage type of the
// parameter: callers load into float, call these functions, and round once at
// the store.
//
// The order of operations mirrors mlx.optimizers.Adafactor line by line (see
// the comment on each function), so that fp32 results agree with the stock
// optimizer to rounding of the reductions only.

#pragma once

#if defined(__METAL__)
#include <metal_stdlib>
#define AF_CONST constant
#define AF_INLINE inline
#define AF_UINT uint
#define AF_SQRT(x) metal::precise::sqrt(x)
#define AF_RSQRT(x) metal::precise::rsqrt(x)
#define AF_POW(x, y) metal::precise::pow(x, y)
#define AF_MAX(a, b) metal::max(a, b)
#define AF_MIN(a, b) metal::min(a, b)
#else
#include <cmath>
#include <cstdint>
#include <cstring>
#define AF_CONST
#define AF_INLINE inline
#define AF_UINT uint32_t
#define AF_SQRT(x) std::sqrt(x)
#define AF_RSQRT(x) (1.0f / std::sqrt(x))
#define AF_POW(x, y) std::pow(x, y)
#define AF_MAX(a, b) ((a) > (b) ? (a) : (b))
#define AF_MIN(a, b) ((a) < (b) ? (a) : (b))
#endif

// The bits of a float and back. as_type is Metal's reinterpreting cast,
// written unqualified under `using namespace metal` as MLX's
// mlx/backend/metal/kernels/bf16.h writes it: that parses whether the
// compiler treats it as a builtin or as a member of namespace metal.
#if defined(__METAL__)
using namespace metal;
AF_INLINE uint32_t af_float_bits(float x) {
  return as_type<uint32_t>(x);
}
AF_INLINE float af_bits_float(uint32_t u) {
  return as_type<float>(u);
}
#else
inline uint32_t af_float_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
}
inline float af_bits_float(uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
}
#endif

// bfloat16 is the top half of a float (NOTE: [bfloat16 storage] in
// adafactor_kernels.h). To float exactly; from float rounded to nearest
// even, any NaN as 0x7FC0: bit for bit csrc/cpu/types.h and MLX's CPU
// bfloat16_t (tests/metal/test_metal_lint.py compares them).
AF_INLINE float af_bf16_to_float(uint16_t bits) {
  return af_bits_float(static_cast<uint32_t>(bits) << 16);
}
AF_INLINE uint16_t af_float_to_bf16(float v) {
  const uint32_t u = af_float_bits(v);
  const uint32_t rounded = (u + ((u >> 16) & 1u) + 0x7FFFu) >> 16;
  const bool nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  return static_cast<uint16_t>(nan ? 0x7FC0u : rounded);
}

// Numbers both compilers must agree on. The Metal launch plan and the kernels
// read them from here; the CPU path uses the tile sizes.

// Lanes in a simdgroup on Apple GPUs.
static AF_CONST constexpr int AF_SIMD_SIZE = 32;
// Threads per threadgroup for every kernel (8 simdgroups).
static AF_CONST constexpr int AF_THREADS_PER_GROUP = 256;
// Elements each thread reads per loop iteration.
static AF_CONST constexpr int AF_N_READS = 4;
// Tensors with at most this many elements run in one threadgroup end to end.
static AF_CONST constexpr int AF_SMALL_LIMIT = 4096;
// CPU tiling: columns per tile and elements per tile.
static AF_CONST constexpr int AF_CPU_COL_BLOCK = 16384;
static AF_CONST constexpr int AF_CPU_TILE = 65536;
// CPU tiling: at most this many row blocks per matrix, which bounds the
// column-partial scratch to 1/16 of the tensor (NOTE: [column partials]).
static AF_CONST constexpr int AF_CPU_MAX_ROW_BLOCKS = 64;

// Bits of AdafactorHyper::flags.
static AF_CONST constexpr int AF_SCALE_PARAMETER = 1;
static AF_CONST constexpr int AF_RELATIVE_STEP = 2;
static AF_CONST constexpr int AF_WARMUP_INIT = 4;
static AF_CONST constexpr int AF_MOMENTUM = 8;
static AF_CONST constexpr int AF_WEIGHT_DECAY = 16;
static AF_CONST constexpr int AF_STOCHASTIC_ROUNDING = 32;

// Constructor options of the optimizer, fixed for its lifetime.
struct AdafactorHyper {
  float eps1; // added to g^2 before the second-moment averages
  float eps2; // floor of RMS(p) when scale_parameter is set
  float clip_threshold; // the update is clipped at this RMS
  float decay_rate; // beta2 = 1 - t^decay_rate
  float beta1; // first-moment coefficient, used if flags & AF_MOMENTUM
  float one_minus_beta1; // 1 - beta1, computed in double on the host as stock
  float weight_decay; // decoupled weight decay, used if flags & AF_WEIGHT_DECAY
  int flags; // AF_* bits above
  AF_UINT seed; // of the stochastic rounding (NOTE: [stochastic rounding])
};

// Values that depend on the step count and learning rate, same for every
// tensor of the step.
struct AdafactorStepScalars {
  float beta2; // 1 - t^decay_rate
  float one_minus_beta2; // 1 - beta2, rounded as stock rounds it
  float rel_step; // relative step size, or the learning rate
};

// Values of one tensor after its reductions.
struct AdafactorTensorScalars {
  float lr; // parameter_scale * rel_step
  float clip_scale; // 1 / max(1, RMS(u) / clip_threshold)
};

// stock: beta_2 = 1.0 - (step**decay_rate); relative step size
//        min(1e-6 * step if warmup_init else 1e-2, rsqrt(step)), or the
//        learning rate when relative_step is off.
AF_INLINE AdafactorStepScalars
adafactor_step_scalars(float t, float learning_rate, AdafactorHyper h) {
  AdafactorStepScalars s;
  s.beta2 = 1.0f - AF_POW(t, h.decay_rate);
  s.one_minus_beta2 = 1.0f - s.beta2;
  if (h.flags & AF_RELATIVE_STEP) {
    float min_step = (h.flags & AF_WARMUP_INIT) ? 1e-6f * t : 1e-2f;
    s.rel_step = AF_MIN(min_step, AF_RSQRT(t));
  } else {
    s.rel_step = learning_rate;
  }
  return s;
}

// stock: parameter_scale = max(eps[1], RMS(p)); lr = parameter_scale * rel.
// Means are a sum times 1/n, as MLX computes them; `inv_n` is (float)(1.0 / n)
// and is infinite for empty tensors, which makes their means NaN as in stock.
AF_INLINE float adafactor_tensor_lr(
    float sum_p2,
    float inv_n,
    AdafactorStepScalars s,
    AdafactorHyper h) {
  if (h.flags & AF_SCALE_PARAMETER) {
    float rms = AF_SQRT(sum_p2 * inv_n);
    return AF_MAX(h.eps2, rms) * s.rel_step;
  }
  return s.rel_step;
}

// stock: update / max(1.0, RMS(update) / clip_threshold). Returned as the
// reciprocal, so that each element is multiplied, not divided: a division
// per element kept the bfloat16 step compute-bound. u * (1 / d) differs from
// u / d by at most an ulp, and only where clipping binds (d = 1 is exact);
// Inf and NaN denominators give the same results either way.
AF_INLINE float
adafactor_clip_scale(float sum_u2, float inv_n, AdafactorHyper h) {
  return 1.0f / AF_MAX(1.0f, AF_SQRT(sum_u2 * inv_n) / h.clip_threshold);
}

// stock: update = square(gradient) + eps[0].
AF_INLINE float adafactor_sq_grad(float g, AdafactorHyper h) {
  return g * g + h.eps1;
}

// stock: (beta_2 * state) + ((1 - beta_2) * mean).
AF_INLINE float
adafactor_ema(float state, float mean, AdafactorStepScalars s) {
  return s.beta2 * state + s.one_minus_beta2 * mean;
}

// stock: r_factor = rsqrt(row / mean(row, axis=-1)).
AF_INLINE float adafactor_row_factor(float row, float row_mean) {
  return AF_RSQRT(row / row_mean);
}

// stock: c_factor = rsqrt(col).
AF_INLINE float adafactor_col_factor(float col) {
  return AF_RSQRT(col);
}

// stock: (r_factor[..., None] * c_factor[..., None, :]) * gradient.
AF_INLINE float adafactor_factored_update(float r, float c, float g) {
  return (r * c) * g;
}

// stock: rsqrt(exp_avg_sq) * gradient.
AF_INLINE float adafactor_flat_update(float sq, float g) {
  return AF_RSQRT(sq) * g;
}

// The last part of the step for one element: clip, scale, momentum, weight
// decay and the parameter update. `m` is the first moment, read and written
// only when flags & AF_MOMENTUM. Returns the new parameter value.
//
// stock: update = lr * (update / clip_denom);   (here: * clip_scale)
//        exp_avg = beta_1 * exp_avg + (1 - beta_1) * update; update = exp_avg;
//        parameter = parameter + parameter * (-weight_decay * lr);
//        return parameter - update.
#if defined(__METAL__)
AF_INLINE float adafactor_apply(
    float p,
    float u,
    thread float& m,
    AdafactorTensorScalars ts,
    AdafactorHyper h) {
#else
AF_INLINE float adafactor_apply(
    float p,
    float u,
    float& m,
    AdafactorTensorScalars ts,
    AdafactorHyper h) {
#endif
  u = ts.lr * (u * ts.clip_scale);
  if (h.flags & AF_MOMENTUM) {
    m = h.beta1 * m + h.one_minus_beta1 * u;
    u = m;
  }
  if (h.flags & AF_WEIGHT_DECAY) {
    p = p + p * (-h.weight_decay * ts.lr);
  }
  return p - u;
}

// NOTE: [stochastic rounding]
// With AF_STOCHASTIC_ROUNDING, a new parameter or exp_avg stored in
// bfloat16 or float16 is rounded from its float32 value to one of its two
// neighbours in the storage type, up (away from zero) with probability equal
// to the fractional distance to the upper one, so that the expected stored
// value is the float32 value. NaN, Inf and values that round to Inf behave
// as with round to nearest, and a finite value never rounds to Inf.
//
// The random bits are a pure function of (seed, the parameter's path, the
// step count, the stream, the element index): MurmurHash3's 32-bit
// finalizer (fmix32) of the index mixed with a key, one per element (two
// multiplies: a second round cost a bfloat16 step a further 15-25% on the
// reference machine and buys nothing rounding can see). The key
// of a tensor (adafactor_tensor_key, on the host: the seed and an FNV-1a
// hash of the path) is mixed with the step and the stream (0: the
// parameter, 1: exp_avg) once per tensor. So the CPU path and the Metal
// kernels draw bitwise the same bits, whatever the thread count, tiling,
// eager or compiled step, data-parallel rank, or a resumed run. The
// rounding below is exact float32 arithmetic (every operation's result is
// representable), so both produce bitwise the same values.

// MurmurHash3's finalizer: a bijection of 32-bit words with full avalanche.
AF_INLINE AF_UINT adafactor_fmix32(AF_UINT x) {
  x ^= x >> 16;
  x *= 0x85ebca6bu;
  x ^= x >> 13;
  x *= 0xc2b2ae35u;
  x ^= x >> 16;
  return x;
}

// The streams of a tensor.
static AF_CONST constexpr int AF_STREAM_PARAM = 0;
static AF_CONST constexpr int AF_STREAM_EXP_AVG = 1;

// The key of a tensor: the seed and the hash of its path.
AF_INLINE AF_UINT adafactor_tensor_key(AF_UINT seed, AF_UINT path_hash) {
  return adafactor_fmix32(adafactor_fmix32(seed) ^ path_hash);
}

// The key of one stream of a tensor at step `step`.
AF_INLINE AF_UINT
adafactor_stream_key(AF_UINT tensor_key, AF_UINT step, AF_UINT stream) {
  const AF_UINT k = adafactor_fmix32(tensor_key ^ (step * 0x9e3779b9u));
  return adafactor_fmix32(k ^ (stream * 0x85ebca77u + 0x27d4eb2fu));
}

// The 32 random bits of element (index_hi * 2^32 + index_lo) of a stream.
AF_INLINE AF_UINT
adafactor_random_bits(AF_UINT key, AF_UINT index_lo, AF_UINT index_hi) {
  return adafactor_fmix32((index_lo ^ key) + index_hi * 0x9e3779b9u);
}

// `v` rounded stochastically to a value bfloat16 represents, with the
// random `bits` (their low 16 are used): the bits below bfloat16's are
// added before the truncation, so v rounds away from zero with probability
// (its distance to the lower neighbour) / (the spacing).
AF_INLINE float adafactor_round_bf16(float v, AF_UINT bits) {
  const AF_UINT u = af_float_bits(v);
  // NaN, Inf and values that round to Inf: left to round to nearest.
  if ((u & 0x7fffffffu) >= 0x7f7f8000u) {
    return v;
  }
  const AF_UINT up = (u + (bits & 0xffffu)) & 0xffff0000u;
  // Never past the largest finite value.
  return (up & 0x7f800000u) == 0x7f800000u ? af_bits_float(u & 0xffff0000u)
                                            : af_bits_float(up);
}

// `v` rounded stochastically to a value float16 represents, with the random
// `bits` (their high 24 are used). The lower neighbour `lo` and the spacing
// are exact in float32, and so is the fractional distance.
AF_INLINE float adafactor_round_f16(float v, AF_UINT bits) {
  const AF_UINT u = af_float_bits(v);
  const AF_UINT mag = u & 0x7fffffffu;
  // NaN, Inf and values that round to Inf (>= 65520): left to round to
  // nearest.
  if (mag >= 0x477ff000u) {
    return v;
  }
  const float a = af_bits_float(mag);
  float lo;
  float spacing;
  if (mag >= 0x38800000u) {
    // Normal in float16 (>= 2^-14): 10 fraction bits.
    lo = af_bits_float(mag & 0xffffe000u);
    spacing = af_bits_float((mag & 0x7f800000u) - (10u << 23));
  } else {
    // Subnormal in float16: multiples of 2^-24.
    spacing = 1.0f / 16777216.0f;
    lo = float(AF_UINT(a * 16777216.0f)) * spacing;
  }
  const float frac = (a - lo) / spacing;
  const float draw = float(bits >> 8) * (1.0f / 16777216.0f);
  float r = draw < frac ? lo + spacing : lo;
  // Never past the largest finite value.
  r = r > 65504.0f ? lo : r;
  return (u & 0x80000000u) ? -r : r;
}
