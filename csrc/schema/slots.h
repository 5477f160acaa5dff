// Where each tensor's arrays live in the step's flat inputs and outputs.
//
// NOTE: [slot layout]
// The fused step takes and returns flat vectors of arrays:
//   inputs  = [step, learning_rate, <tensor 0>, <tensor 1>, ...]
//   <tensor> = param, grad, then its state entries
//   outputs = per tensor: param, then its state entries
// A tensor's state entries, in order, are decided by state_entries() alone:
//   ndim >= 2  exp_avg_sq_row, exp_avg_sq_col   (float32, factored)
//   ndim < 2   exp_avg_sq                       (float32)
//   (the second moment is float64 for float64 parameters, NOTE: [float64])
//   beta_1     exp_avg                          (parameter dtype)
// SlotLayout is the only code that turns that into positions; every walk
// over the inputs or outputs (validation, the lazy chunks, output shapes,
// the CPU runner, the Metal plan, the Python state dicts) goes through it.
// A new state entry is a new Entry, its rule in state_entries(), its shape
// and dtype below, and the math that uses it.

#pragma once

#include <array>
#include <cstdint>
#include <vector>

#include "mlx/array.h"

#include "adafactor_math.h"

namespace mlx_fused_adafactor {

namespace mx = mlx::core;

// The per-parameter state entries, in slot order.
enum class Entry : uint8_t {
  Row, // exp_avg_sq_row
  Col, // exp_avg_sq_col
  Sq, // exp_avg_sq
  ExpAvg, // exp_avg
};
inline constexpr int kNumEntries = 4;

// The key of the entry in the optimizer's state dict.
const char* entry_key(Entry e);
// Shape and dtype of the entry for a parameter of `shape` and `dtype`.
mx::Shape entry_shape(Entry e, const mx::Shape& shape);
mx::Dtype entry_dtype(Entry e, mx::Dtype dtype);

// Parameters with at least this many dimensions use factored statistics.
inline constexpr int kFactoredMinNdim = 2;

// A small ordered set of entries.
class EntryList {
 public:
  void push(Entry e) {
    items_[size_++] = e;
  }
  int size() const {
    return size_;
  }
  Entry operator[](int i) const {
    return items_[i];
  }
  const Entry* begin() const {
    return items_.data();
  }
  const Entry* end() const {
    return items_.data() + size_;
  }
  // Position of `e` in the list, or -1.
  int index_of(Entry e) const;

 private:
  std::array<Entry, kNumEntries> items_{};
  int size_ = 0;
};

// The state entries of a parameter of `ndim` dimensions, in slot order.
EntryList state_entries(int ndim, const AdafactorHyper& h);

// The positions of one tensor's arrays.
struct TensorSlots {
  int ndim;
  EntryList entries;
  int first_in; // inputs[first_in] is the parameter
  int first_out; // outputs[first_out] is the new parameter

  bool factored() const {
    return ndim >= kFactoredMinNdim;
  }
  int param_in() const {
    return first_in;
  }
  int grad_in() const {
    return first_in + 1;
  }
  int param_out() const {
    return first_out;
  }
  bool has(Entry e) const {
    return entries.index_of(e) >= 0;
  }
  // Input and output positions of entry `e`; the tensor must have it.
  int state_in(Entry e) const;
  int state_out(Entry e) const;
  int num_in() const {
    return 2 + entries.size();
  }
  int num_out() const {
    return 1 + entries.size();
  }
};

class SlotLayout {
 public:
  // Step-wide inputs.
  static constexpr int kStep = 0;
  static constexpr int kLr = 1;
  static constexpr int kFirstTensor = 2;

  // The layout of tensors with these numbers of dimensions.
  SlotLayout(const std::vector<int>& ndims, const AdafactorHyper& h);
  // The layout of a primitive's `inputs` (the one decoder of them).
  static SlotLayout of_inputs(
      const std::vector<mx::array>& inputs,
      const AdafactorHyper& h);

  const std::vector<TensorSlots>& tensors() const {
    return tensors_;
  }
  size_t size() const {
    return tensors_.size();
  }
  const TensorSlots& operator[](size_t i) const {
    return tensors_[i];
  }
  int num_inputs() const {
    return num_inputs_;
  }
  int num_outputs() const {
    return num_outputs_;
  }

 private:
  SlotLayout() = default;
  void add(int ndim, const AdafactorHyper& h);

  std::vector<TensorSlots> tensors_;
  int num_inputs_ = kFirstTensor;
  int num_outputs_ = 0;
};

} // namespace mlx_fused_adafactor
