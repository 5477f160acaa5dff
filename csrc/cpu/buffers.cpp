#include "cpu/buffers.h"

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "cpu/faults.h"

namespace mlx_fused_adafactor::cpu {

namespace {

constexpr uintptr_t kHugePage = uintptr_t(2) << 20;

// Advise the whole huge pages inside [p, p + bytes).
void advise_huge_pages(void* p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const auto begin = reinterpret_cast<uintptr_t>(p);
  const uintptr_t lo = (begin + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t hi = (begin + bytes) & ~(kHugePage - 1);
  if (hi > lo) {
    // Advice only: a kernel without THP refuses it and nothing changes.
    madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
  }
#else
  (void)p;
  (void)bytes;
#endif
}

} // namespace

mx::allocator::Data fresh_buffer(size_t bytes) {
  auto data = mx::allocator::malloc(bytes);
  if (bytes >= kHugePageMinBytes) {
    advise_huge_pages(data.buffer().raw_ptr(), bytes);
  }
  return data;
}

std::vector<char> donatable_inputs(
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs,
    const std::vector<int>& out_of_input) {
  std::vector<char> ok(inputs.size(), 0);
  // The other outputs' copies of the input list.
  std::vector<std::vector<mx::array>*> copies;
  for (auto& o : outputs) {
    auto& list = o.inputs();
    if (&list != &inputs && list.size() == inputs.size()) {
      copies.push_back(&list);
    }
  }
  const mx::array& stand_in = inputs[0];
  for (size_t j = 0; j < inputs.size(); ++j) {
    const int o = out_of_input[j];
    if (o < 0) {
      continue;
    }
    const auto& in = inputs[j];
    const auto& out = outputs[o];
    if (in.nbytes() < kDonateMinBytes || !in.flags().row_contiguous ||
        in.data_size() != in.size() || in.size() != out.size() ||
        in.itemsize() != out.itemsize()) {
      continue;
    }
    // Hide the copies, test, and put them back.
    std::vector<std::vector<mx::array>*> hidden;
    for (auto* list : copies) {
      if ((*list)[j].id() == in.id()) {
        (*list)[j] = stand_in;
        hidden.push_back(list);
      }
    }
    ok[j] = (in.is_donatable() || AF_FAULT(Fault::DonateHeld)) &&
        !AF_FAULT(Fault::NoDonation);
    for (auto* list : hidden) {
      (*list)[j] = in;
    }
  }
  return ok;
}

} // namespace mlx_fused_adafactor::cpu
