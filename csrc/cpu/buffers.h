// Output buffers of the CPU step: an input's own buffer where MLX allows
// it, otherwise a fresh one from MLX's allocator.
//
// NOTE: [output buffers]
// The step keeps no memory between calls: every output buffer either takes
// over an input's buffer (NOTE: [donation]) or comes from MLX's allocator,
// so MLX's active-memory count, mx.clear_cache() and mx.set_cache_limit()
// see and govern all of it, as they do stock's temporaries. A fresh buffer
// costs a page fault and a zeroed page per 4 KiB on first touch, more than
// the step's own write of it; fresh buffers of at least kHugePageMinBytes
// are therefore advised as transparent huge pages (MADV_HUGEPAGE on the
// whole 2 MiB pages inside them; Linux runs THP in `madvise` mode by
// default), which makes that one fault per 2 MiB. Below that size glibc
// serves buffers from its heap, where they are reused without faults, and
// the advice would outlive the buffer in a heap mapping.
//
// NOTE: [donation]
// MLX lets an op write its output into an input's buffer when the input is
// donatable: nothing but the op holds the array or its data
// (array::is_donatable). A primitive with several outputs never passes that
// test as it stands, because MLX gives every output its own copy of the
// input list (array::make_arrays): each input is held once per output.
// donatable_inputs() therefore hides, for the moment of the test, the
// copies held by the other outputs of this same primitive (it points their
// entry at the step scalar and puts the input back), and asks
// is_donatable() about what remains: the list of the output being
// evaluated and anything outside the primitive. So an input the caller
// still holds, one passed twice, one whose data a pending task still reads
// (MLX's encoder holds it), or a tracer's (cpu::eval holds those), stays as
// it is. A donated buffer is read and written element by element in place:
// every pass reads an element before it writes the same element, and no
// pass reads another element's new value.

#pragma once

#include <cstddef>
#include <vector>

#include "mlx/allocator.h"
#include "mlx/array.h"

namespace mlx_fused_adafactor::cpu {

namespace mx = mlx::core;

// NOTE: [output buffers]: the smallest fresh buffer advised as huge pages
// (glibc maps allocations of at least 32 MiB on their own).
constexpr size_t kHugePageMinBytes = size_t(32) << 20;

// NOTE: [donation]: smaller inputs are not offered (MLX's cache serves
// such buffers for less than the test costs).
constexpr size_t kDonateMinBytes = size_t(16) << 10;

// A fresh buffer of `bytes` from MLX's allocator (NOTE: [output buffers]).
mx::allocator::Data fresh_buffer(size_t bytes);

// Which of `inputs` may give its buffer to `outputs[out_of_input[j]]`
// (-1: none), for a primitive whose outputs are `outputs`
// (NOTE: [donation]).
std::vector<char> donatable_inputs(
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs,
    const std::vector<int>& out_of_input);

} // namespace mlx_fused_adafactor::cpu
