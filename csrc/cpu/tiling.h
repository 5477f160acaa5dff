// How the CPU path cuts a step into work items and scratch.
//
// NOTE: [tiles]
// Every pass runs over work items that depend only on the shapes: a factored
// matrix is cut into tiles of at most AF_CPU_COL_BLOCK columns and a bounded
// number of row blocks, a flat tensor into ranges of AF_CPU_TILE elements.
// Each item writes its own partial sums and the partials are combined in
// item order, so results are bitwise identical from run to run and do not
// depend on the number of threads.
//
// NOTE: [column partials]
// Column sums of a tile go to a (row block, column) scratch row owned by that
// tile; at most AF_CPU_MAX_ROW_BLOCKS row blocks per matrix, and at least
// AF_CPU_TILE / AF_CPU_COL_BLOCK rows per block otherwise, keep the scratch
// at most 1/16 of the tensor.

#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "adafactor_math.h"

namespace mlx_fused_adafactor::cpu {

// The shape of a tensor as the passes see it.
struct Geometry {
  bool factored;
  int64_t n; // elements
  // Factored: `batch` matrices of rows x cols.
  int64_t batch = 1;
  int64_t rows = 0;
  int64_t cols = 0;
  float inv_n; // (float)(1.0 / n), infinite when n == 0
  float inv_rows; // (float)(1.0 / rows)
  float inv_cols; // (float)(1.0 / cols)
};

// Geometry of a tensor of `shape` (factored when it has >= 2 dimensions).
Geometry make_geometry(const std::vector<int64_t>& shape);

// The tiles of a factored tensor (NOTE: [tiles]).
struct Tiling {
  int64_t col_block = 0; // columns per tile
  int64_t n_col_blocks = 0;
  int64_t row_block = 0; // rows per tile
  int64_t n_row_blocks = 0; // 0 when the matrix has no rows
};

Tiling make_tiling(const Geometry& geo);

// One work item: a tile of a factored tensor or a range of a flat one.
struct Item {
  uint32_t tensor;
  uint32_t matrix; // factored: matrix within the batch
  uint32_t row_block; // factored: row block; flat: element range
  uint32_t col_block; // factored: column block
};

// Row and column range of a factored tile.
struct TileRange {
  int64_t r0, r1, c0, c1;
};

inline TileRange tile_range(const Tiling& t, int64_t rows, int64_t cols,
                            const Item& it) {
  TileRange r;
  r.r0 = it.row_block * t.row_block;
  r.r1 = r.r0 + t.row_block < rows ? r.r0 + t.row_block : rows;
  r.c0 = it.col_block * t.col_block;
  r.c1 = r.c0 + t.col_block < cols ? r.c0 + t.col_block : cols;
  return r;
}

// Element range of a flat item.
inline void flat_range(int64_t n, const Item& it, int64_t& lo, int64_t& hi) {
  lo = static_cast<int64_t>(it.row_block) * AF_CPU_TILE;
  hi = lo + AF_CPU_TILE < n ? lo + AF_CPU_TILE : n;
}

// Offsets of a factored tensor's regions in the step's float scratch.
struct ScratchRegions {
  size_t row_part = 0; // [batch * rows][n_col_blocks] row sums per tile
  size_t col_part = 0; // [batch * n_row_blocks][cols] column sums per tile
  size_t row_fac = 0; // [batch * rows] row factors
  size_t col_fac = 0; // [batch * cols] column factors
  size_t fold_part = 0; // [batch * n_row_blocks][cols] T_j partials
};

// Append the items of a tensor to `items` and its scratch to `scratch_size`;
// `fold` says whether the T_j partials are needed
// (NOTE: [folded update sum]).
ScratchRegions plan_tensor(
    uint32_t index,
    const Geometry& geo,
    const Tiling& tiles,
    bool fold,
    std::vector<Item>& items,
    size_t& scratch_size);

} // namespace mlx_fused_adafactor::cpu
