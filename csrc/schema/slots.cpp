#include "schema/slots.h"

#include <stdexcept>

#include "schema/hyper.h"

namespace mlx_fused_adafactor {

const char* entry_key(Entry e) {
  switch (e) {
    case Entry::Row:
      return "exp_avg_sq_row";
    case Entry::Col:
      return "exp_avg_sq_col";
    case Entry::Sq:
      return "exp_avg_sq";
    case Entry::ExpAvg:
      return "exp_avg";
  }
  return "";
}

mx::Shape entry_shape(Entry e, const mx::Shape& shape) {
  switch (e) {
    case Entry::Row:
      return mx::Shape(shape.begin(), shape.end() - 1);
    case Entry::Col: {
      mx::Shape col(shape.begin(), shape.end() - 2);
      col.push_back(shape.back());
      return col;
    }
    case Entry::Sq:
    case Entry::ExpAvg:
      return shape;
  }
  return shape;
}

mx::Dtype entry_dtype(Entry e, mx::Dtype dtype) {
  // The second moment is small and kept in float32, or float64 for float64
  // parameters (NOTE: [float64]); the first moment is as large as the
  // parameter and kept in its dtype, as stock keeps it.
  if (e == Entry::ExpAvg || dtype == mx::float64) {
    return dtype;
  }
  return mx::float32;
}

int EntryList::index_of(Entry e) const {
  for (int i = 0; i < size_; ++i) {
    if (items_[i] == e) {
      return i;
    }
  }
  return -1;
}

EntryList state_entries(int ndim, const AdafactorHyper& h) {
  EntryList list;
  if (ndim >= kFactoredMinNdim) {
    list.push(Entry::Row);
    list.push(Entry::Col);
  } else {
    list.push(Entry::Sq);
  }
  if (has_flag(h, AF_MOMENTUM)) {
    list.push(Entry::ExpAvg);
  }
  return list;
}

int TensorSlots::state_in(Entry e) const {
  const int k = entries.index_of(e);
  if (k < 0) {
    throw std::logic_error("[adafactor] tensor has no such state entry");
  }
  return first_in + 2 + k;
}

int TensorSlots::state_out(Entry e) const {
  const int k = entries.index_of(e);
  if (k < 0) {
    throw std::logic_error("[adafactor] tensor has no such state entry");
  }
  return first_out + 1 + k;
}

void SlotLayout::add(int ndim, const AdafactorHyper& h) {
  TensorSlots t{ndim, state_entries(ndim, h), num_inputs_, num_outputs_};
  num_inputs_ += t.num_in();
  num_outputs_ += t.num_out();
  tensors_.push_back(t);
}

SlotLayout::SlotLayout(const std::vector<int>& ndims, const AdafactorHyper& h) {
  tensors_.reserve(ndims.size());
  for (int ndim : ndims) {
    add(ndim, h);
  }
}

SlotLayout SlotLayout::of_inputs(
    const std::vector<mx::array>& inputs,
    const AdafactorHyper& h) {
  SlotLayout layout;
  while (layout.num_inputs_ < static_cast<int>(inputs.size())) {
    layout.add(inputs[layout.num_inputs_].ndim(), h);
  }
  if (layout.num_inputs_ != static_cast<int>(inputs.size())) {
    throw std::logic_error("[adafactor] inputs do not follow the slot layout");
  }
  return layout;
}

} // namespace mlx_fused_adafactor
