// Launch arguments shared by the Metal kernels (kernels/*.metal) and the
// launch plan that encodes them (csrc/metal/plan.cpp).
//
// Compiles as Metal Shading Language and as C++17: the plan fills these
// structs byte for byte as the kernels read them (only 32-bit fields).
//
// NOTE: [buffer indices]
// Every kernel binds each buffer at the same index, whichever subset of them
// it uses, so the plan has one table for all kernels. They are macros because
// a `[[buffer(n)]]` attribute needs an integer constant before templates are
// instantiated.
//
// NOTE: [factored tiles]
// A factored tensor is B matrices of R x C. Its reduction and apply kernels
// share one grid: threadgroup (j, i, b) covers columns [j * col_block, +col_block)
// and rows [i * row_block, +row_block) of matrix b. Row sums are written per
// (row, column block) and column sums per (row block, column); the next
// kernel adds them in index order, so results do not depend on scheduling.

#pragma once

#include "adafactor_math.h"

// Step-wide inputs.
#define AF_BUF_STEP 0 // float: the step count t
#define AF_BUF_LR 1 // float: the learning rate
#define AF_BUF_HYPER 2 // AdafactorHyper
#define AF_BUF_ARGS 3 // AdafactorTensorArgs
// Tensor inputs.
#define AF_BUF_P 4 // parameter
#define AF_BUF_G 5 // gradient
#define AF_BUF_S0 6 // exp_avg_sq_row (factored) or exp_avg_sq
#define AF_BUF_S1 7 // exp_avg_sq_col (factored)
#define AF_BUF_M 8 // exp_avg (momentum)
// Tensor outputs.
#define AF_BUF_P_OUT 9
#define AF_BUF_S0_OUT 10
#define AF_BUF_S1_OUT 11
#define AF_BUF_M_OUT 12
// Scratch, float32 (NOTE: [factored tiles]).
#define AF_BUF_ROW_PART 13 // [B * R][n_col_blocks] partial row sums
#define AF_BUF_COL_PART 14 // [B * n_row_blocks][C] partial column sums
#define AF_BUF_GROUP_PART 15 // [n_groups][AF_GROUP_PART_SIZE] per-group sums
#define AF_BUF_ROW_FAC 16 // [B * R] row factors
#define AF_BUF_COL_FAC 17 // [B * C] column factors
#define AF_BUF_U2_PART 18 // [n_groups] partial sums of u^2
#define AF_NUM_BUFFERS 19

// Columns of a factored tile, and those a simdgroup reads at once (a chunk).
static AF_CONST constexpr int AF_COL_BLOCK = AF_THREADS_PER_GROUP * AF_N_READS;
static AF_CONST constexpr int AF_CHUNK = AF_SIMD_SIZE * AF_N_READS;
// Most rows in a factored tile: the apply kernels keep one row factor per
// tile row in threadgroup memory.
static AF_CONST constexpr int AF_MAX_TILE_ROWS = 2048;
// Most row blocks of a factored tensor; fewer are used when R is small
// (the column factors of a tile read one partial per row block).
static AF_CONST constexpr int AF_MAX_ROW_BLOCKS = 64;
// Elements per threadgroup of the 1-D kernels.
static AF_CONST constexpr int AF_FLAT_BLOCK = AF_COL_BLOCK * 8;
// Per-group sums of the factored reduction: sum p^2, sum (g^2 + eps1), and
// the sum of the old row state over the tile's rows (first column block).
static AF_CONST constexpr int AF_GROUP_PART_SIZE = 4;
static AF_CONST constexpr int AF_PART_P2 = 0;
static AF_CONST constexpr int AF_PART_G2 = 1;
static AF_CONST constexpr int AF_PART_ROW_OLD = 2;
// The 1-D kernels keep sum p^2 and sum u^2 per group.
static AF_CONST constexpr int AF_PART_U2 = 1;

// Geometry of one tensor, the same for each of its kernels.
struct AdafactorTensorArgs {
  int n; // elements
  int batch; // B: matrices (factored), 1 otherwise
  int rows; // R (factored)
  int cols; // C (factored)
  int row_block; // rows per tile
  int n_row_blocks; // tiles along R
  int n_col_blocks; // tiles along C
  int n_groups; // threadgroups of one kernel of this tensor
  float inv_n; // (float)(1.0 / n)
  float inv_rows; // (float)(1.0 / R)
  float inv_cols; // (float)(1.0 / C)
  AF_UINT key; // the tensor's key (NOTE: [stochastic rounding])
};
