// Schemas of the gvu_kernels ops and their CPU implementations. Fake (meta) kernels and autograd are
// registered from Python in kernels/cpp_ops.py.
#include <torch/library.h>

#include <string>

#include "ops.h"
#include "row_kernels.h"

TORCH_LIBRARY(gvu_kernels, m) {
  m.def(
      "token_logprobs(Tensor logits, Tensor targets, float temperature, int ignore_index, bool return_entropy)"
      " -> (Tensor logp, Tensor lse, Tensor entropy)");
  m.def(
      "token_logprobs_backward(Tensor? grad_logp, Tensor? grad_lse, Tensor? grad_entropy, Tensor logits,"
      " Tensor targets, Tensor lse, Tensor entropy, float temperature, int ignore_index) -> Tensor");
  m.def(
      "linear_token_logprobs(Tensor hidden, Tensor weight, Tensor targets, Tensor? bias, float temperature,"
      " int ignore_index, bool return_entropy, int chunk_size) -> (Tensor logp, Tensor lse, Tensor entropy)");
  // The same forward for a frozen head (hidden needs a gradient, weight and bias do not): also returns
  // cen = E - W[t] and ent_dir = F + H E, (N, D) in weight's dtype (ent_dir (0, 0) without entropy), from which
  // the backward forms dH without recomputing logits. See linear_token_logprobs.cpp.
  m.def(
      "linear_token_logprobs_frozen(Tensor hidden, Tensor weight, Tensor targets, Tensor? bias, float temperature,"
      " int ignore_index, bool return_entropy, int chunk_size) -> (Tensor logp, Tensor lse, Tensor entropy,"
      " Tensor cen, Tensor ent_dir)");
  m.def(
      "linear_token_logprobs_backward(Tensor? grad_logp, Tensor? grad_lse, Tensor? grad_entropy, Tensor hidden,"
      " Tensor weight, Tensor targets, Tensor? bias, Tensor lse, Tensor entropy, float temperature,"
      " int ignore_index, int chunk_size, bool[3] output_mask) -> (Tensor grad_hidden, Tensor grad_weight,"
      " Tensor grad_bias)");
  m.def("group_advantages(Tensor rewards, int group_size, float eps, str scale, bool unbiased) -> Tensor");
  // Introspection helpers (no tensors): used by tests and the benchmark's machine info.
  m.def("default_chunk_size(int n, int v) -> int", &gvu::default_chunk_size);
  m.def("simd_level() -> str", []() { return std::string(gvu::simd_level()); });
}

TORCH_LIBRARY_IMPL(gvu_kernels, CPU, m) {
  m.impl("token_logprobs", &gvu::token_logprobs_fwd);
  m.impl("token_logprobs_backward", &gvu::token_logprobs_bwd);
  m.impl("linear_token_logprobs", &gvu::linear_token_logprobs_fwd);
  m.impl("linear_token_logprobs_frozen", &gvu::linear_token_logprobs_frozen_fwd);
  m.impl("linear_token_logprobs_backward", &gvu::linear_token_logprobs_bwd);
  m.impl("group_advantages", &gvu::group_advantages_op);
}
