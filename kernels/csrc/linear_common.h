// Shared by the linear_token_logprobs forward (linear_token_logprobs.cpp) and backward (linear_backward.cpp).
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <tuple>

#include "rows.h"

namespace gvu {

// The budget for a tile of logits (forward chunk or backward block), never all N x V of them.
constexpr int64_t kChunkBytes = int64_t{64} << 20;

struct Rows {
  at::Tensor idx;  // (n,) int64 rows kept, or undefined when every row is kept
  int64_t n = 0;
};

inline Rows kept_rows(const at::Tensor& targets, int64_t ignore_index) {
  Rows r;
  const at::Tensor keep = targets.ne(ignore_index);
  r.n = keep.sum().item<int64_t>();
  if (r.n != targets.size(0)) r.idx = keep.nonzero().squeeze(1).contiguous();
  return r;
}

inline at::Tensor take(const at::Tensor& t, const Rows& rows) { return rows.idx.defined() ? t.index_select(0, rows.idx) : t; }

inline void check_inputs(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
                  const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1),
              "gvu_kernels: need hidden (N, D) and weight (V, D), got ", hidden.sizes(), " and ", weight.sizes());
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == hidden.size(0), "gvu_kernels: targets must be (",
              hidden.size(0), ",), got ", targets.sizes());
  TORCH_CHECK(hidden.device().is_cpu() && weight.device().is_cpu(), "gvu_kernels: CPU op got a non-CPU tensor");
  if (bias.has_value() && bias->defined())
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "gvu_kernels: bias must be (",
                weight.size(0), ",), got ", bias->sizes());
  dtype_of(hidden);
  dtype_of(weight);
}

// The chunk's logits, (rows, V) in weight's dtype, written into buf.
inline void chunk_logits(at::Tensor& buf, const at::Tensor& h, const at::Tensor& weight, const at::Tensor& bias) {
  const at::Tensor hc = h.scalar_type() == weight.scalar_type() ? h : h.to(weight.scalar_type());
  if (bias.defined())
    at::addmm_out(buf, bias, hc, weight.t());
  else
    at::mm_out(buf, hc, weight.t());
}

inline at::Tensor bias_in(const c10::optional<at::Tensor>& bias, const at::Tensor& weight) {
  if (!bias.has_value() || !bias->defined()) return at::Tensor();
  return bias->to(weight.scalar_type()).contiguous();
}

int64_t default_chunk_size(int64_t N, int64_t V);  // fp32 logits; see chunk_rows

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_token_logprobs_bwd(
    const c10::optional<at::Tensor>& grad_logp, const c10::optional<at::Tensor>& grad_lse,
    const c10::optional<at::Tensor>& grad_entropy, const at::Tensor& hidden, const at::Tensor& weight,
    const at::Tensor& targets_in, const c10::optional<at::Tensor>& bias_opt, const at::Tensor& lse_in,
    const at::Tensor& entropy_in, double temperature, int64_t ignore_index, int64_t chunk_size,
    std::array<bool, 3> output_mask);

}  // namespace gvu
