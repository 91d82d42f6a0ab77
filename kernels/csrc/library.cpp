// The gvu_kernels library itself and its introspection helper. Each op's schemas and CPU kernels are registered
// next to the kernels, in kernels/csrc/<op>.cpp (TORCH_LIBRARY_FRAGMENT); fake kernels and autograd in
// kernels/cpp_ops/<op>.py.
#include <torch/library.h>

#include <string>

#include "row_kernels.h"
#include "rows.h"

TORCH_LIBRARY(gvu_kernels, m) {
  // The ISA level row_kernels.cpp picked at load time: used by tests and the benchmark's machine info.
  m.def("simd_level() -> str", []() { return std::string(gvu::simd_level()); });
  // The AVX-512 intrinsic exp loops on or off between ops (row_kernels.h), for tests and A/B benchmarks: the old value.
  m.def("set_avx512_loops(bool on) -> bool", [](bool on) { return gvu::set_avx512_loops(on); });
  // Whether linear_token_logprobs forms bf16 / fp16 products in fp32 tiles (no native bf16, or forced).
  m.def("fp32_tiles() -> bool", []() { return gvu::fp32_tiles(); });
  // How many N x V buffers were reused so far (rows.h: reusable_rows), [token gradients, saved logits].
  m.def("reuse_counts() -> int[]", []() { return gvu::reuse_counts(); });
}
