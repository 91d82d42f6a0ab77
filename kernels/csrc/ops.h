// Declarations of the CPU kernels registered in register.cpp (schemas there).
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <tuple>

namespace gvu {

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_fwd(const at::Tensor& logits, const at::Tensor& targets,
                                                                   double temperature, int64_t ignore_index,
                                                                   bool return_entropy);
at::Tensor token_logprobs_bwd(const c10::optional<at::Tensor>& grad_logp, const c10::optional<at::Tensor>& grad_lse,
                              const c10::optional<at::Tensor>& grad_entropy, const at::Tensor& logits,
                              const at::Tensor& targets, const at::Tensor& lse, const at::Tensor& entropy,
                              double temperature, int64_t ignore_index);

int64_t default_chunk_size(int64_t N, int64_t V);
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_token_logprobs_fwd(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
    const c10::optional<at::Tensor>& bias, double temperature, int64_t ignore_index, bool return_entropy,
    int64_t chunk_size);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_token_logprobs_frozen_fwd(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
    const c10::optional<at::Tensor>& bias, double temperature, int64_t ignore_index, bool return_entropy,
    int64_t chunk_size);
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_token_logprobs_bwd(
    const c10::optional<at::Tensor>& grad_logp, const c10::optional<at::Tensor>& grad_lse,
    const c10::optional<at::Tensor>& grad_entropy, const at::Tensor& hidden, const at::Tensor& weight,
    const at::Tensor& targets, const c10::optional<at::Tensor>& bias, const at::Tensor& lse,
    const at::Tensor& entropy, double temperature, int64_t ignore_index, int64_t chunk_size,
    std::array<bool, 3> output_mask);

at::Tensor group_advantages_op(const at::Tensor& rewards, int64_t group_size, double eps, c10::string_view scale,
                               bool unbiased);

}  // namespace gvu
