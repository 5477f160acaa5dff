// Block conversions between float16 and float32 for the CPU passes.
//
// NOTE: [float16 blocks]
// A float16 value converts in one instruction where the hardware has it
// (F16C on x86-64 since 2013, every arm64 core), but GCC does not vectorize
// _Float16 conversions inside the passes' loops, and the branch-free integer
// code of cpu/types.h costs a dozen vector operations per value. The passes
// therefore convert a float16 row (or range) into a float buffer in one call
// before their loops, and a float buffer back after them (stage_floats,
// store_halves in cpu/passes.h); the loops are the float32 loops. The
// conversions round exactly as MLX's float16_t does (round to nearest even,
// MLX's NaN pattern where MLX uses its software type; the hardware's where
// MLX uses __fp16), as tests/cpp/conversions.cpp checks over every 16-bit
// pattern for each path this machine has. The path is chosen once at run
// time (x86-64: F16C when the CPU has it); sanitizer builds run it too.
// Pass 3 stages bfloat16 the same way (its conversions are a shift and a
// rounding the loops vectorize): read and written in place, a large
// bfloat16 parameter updated inside the loop ran 20% slower on the
// reference machine than one staged a block at a time.

#pragma once

#include <cstdint>

#include "cpu/types.h"

namespace mlx_fused_adafactor::cpu {

// dst[i] = to_float(src[i]) for i < n.
void halves_to_floats(const f16* src, float* dst, int64_t n);
// dst[i] = from_float<f16>(src[i]) for i < n.
void floats_to_halves(const float* src, f16* dst, int64_t n);

// The conversion paths, for the tests.
enum class HalfPath { Scalar, F16C, Neon };
// The path the two functions above take on this machine.
HalfPath half_path();
// The same conversions by a given path; false if this machine lacks it.
bool halves_to_floats_by(HalfPath path, const f16* src, float* dst, int64_t n);
bool floats_to_halves_by(HalfPath path, const float* src, f16* dst, int64_t n);

} // namespace mlx_fused_adafactor::cpu
