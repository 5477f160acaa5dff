// How a launch plan is bound and dispatched, written once for two encoders:
// MLX's CommandEncoder (host.cpp, on a Mac) and the emulated encoder of
// tests/metal, so that the emulator runs this code, not a copy of it.
//
// NOTE: [bindings]
// What a dispatch writes is bound with set_output_array and everything else
// with set_input_array: MLX's concurrent encoder derives its barriers from
// exactly these registrations (NOTE: [encoding order] in plan.h), and makes
// only buffers bound this way resident. So every buffer goes through these
// two calls, never through argument buffers, whose contents MLX does not
// track. By-value arguments go through set_bytes (Metal copies them at
// encoding time). An empty array is never indexed; the placeholder, a small
// buffer that nothing writes, is bound in its place so that every index the
// kernel declares has a buffer.

#pragma once

#include <cstdint>

#include "metal/plan.h"

namespace mlx_fused_adafactor::metal {

// `Target` provides:
//   set_kernel(const Dispatch&)             the pipeline of the dispatch
//   buffer(const Binding&) -> Array&        the array of an Input, Output
//                                           or Scratch binding
//   empty(const Array&) -> bool
//   placeholder() -> Array&
//   set_input_array(const Array&, int index, int64_t offset)
//   set_output_array(Array&, int index, int64_t offset)
//   set_bytes(const void*, int64_t size, int index)
//   dispatch_threadgroups(const Dispatch&)
template <typename Target>
void encode_plan(const Plan& plan, Target& t) {
  for (const Dispatch& d : plan.dispatches) {
    t.set_kernel(d);
    for (const Binding& b : d.bindings) {
      if (b.source == Source::Bytes) {
        t.set_bytes(
            b.bytes.data(), static_cast<int64_t>(b.bytes.size()), b.index);
        continue;
      }
      auto& a = t.buffer(b);
      const int64_t offset = b.source == Source::Scratch ? b.offset : 0;
      if (t.empty(a)) {
        t.set_input_array(t.placeholder(), b.index, 0);
      } else if (b.writes()) {
        t.set_output_array(a, b.index, offset);
      } else {
        t.set_input_array(a, b.index, offset);
      }
    }
    t.dispatch_threadgroups(d);
  }
}

} // namespace mlx_fused_adafactor::metal
