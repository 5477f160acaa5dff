#include "cpu/tiling.h"

#include <algorithm>

namespace mlx_fused_adafactor::cpu {

namespace {

float inverse(int64_t n) {
  return static_cast<float>(1.0 / static_cast<double>(n));
}

} // namespace

Geometry make_geometry(const std::vector<int64_t>& shape) {
  Geometry g{};
  g.factored = shape.size() >= 2;
  g.n = 1;
  for (auto d : shape) {
    g.n *= d;
  }
  g.inv_n = inverse(g.n);
  if (g.factored) {
    g.rows = shape[shape.size() - 2];
    g.cols = shape.back();
    g.batch = 1;
    for (size_t d = 0; d + 2 < shape.size(); ++d) {
      g.batch *= shape[d];
    }
    g.inv_rows = inverse(g.rows);
    g.inv_cols = inverse(g.cols);
  }
  return g;
}

Tiling make_tiling(const Geometry& geo) {
  Tiling t;
  if (!geo.factored) {
    return t;
  }
  t.col_block =
      std::max<int64_t>(1, std::min<int64_t>(geo.cols, AF_CPU_COL_BLOCK));
  t.n_col_blocks = (geo.cols + t.col_block - 1) / t.col_block;
  t.row_block = std::max<int64_t>(1, AF_CPU_TILE / t.col_block);
  t.n_row_blocks = (geo.rows + t.row_block - 1) / t.row_block;
  if (t.n_row_blocks > AF_CPU_MAX_ROW_BLOCKS) {
    t.row_block = (geo.rows + AF_CPU_MAX_ROW_BLOCKS - 1) / AF_CPU_MAX_ROW_BLOCKS;
    t.n_row_blocks = (geo.rows + t.row_block - 1) / t.row_block;
  }
  return t;
}

ScratchRegions plan_tensor(
    uint32_t index,
    const Geometry& geo,
    const Tiling& tiles,
    bool fold,
    std::vector<Item>& items,
    size_t& scratch_size) {
  ScratchRegions s;
  if (!geo.factored) {
    const int64_t ranges = (geo.n + AF_CPU_TILE - 1) / AF_CPU_TILE;
    for (int64_t i = 0; i < ranges; ++i) {
      items.push_back({index, 0, static_cast<uint32_t>(i), 0});
    }
    return s;
  }
  const int64_t B = geo.batch;
  s.row_part = scratch_size;
  scratch_size += B * geo.rows * tiles.n_col_blocks;
  s.col_part = scratch_size;
  scratch_size += B * tiles.n_row_blocks * geo.cols;
  s.row_fac = scratch_size;
  scratch_size += B * geo.rows;
  s.col_fac = scratch_size;
  scratch_size += B * geo.cols;
  s.fold_part = scratch_size;
  if (fold) {
    scratch_size += B * tiles.n_row_blocks * geo.cols;
  }
  if (geo.n > 0) {
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t i = 0; i < tiles.n_row_blocks; ++i) {
        for (int64_t j = 0; j < tiles.n_col_blocks; ++j) {
          items.push_back({index, static_cast<uint32_t>(b),
                           static_cast<uint32_t>(i), static_cast<uint32_t>(j)});
        }
      }
    }
  }
  return s;
}

} // namespace mlx_fused_adafactor::cpu
