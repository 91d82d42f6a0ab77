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

// out (M, N) = a (M, K) @ b (K, N) (+ bias: (N,) over rows or (M, 1) over columns), out in the operands' dtype.
// With fp32_tiles() (no native bf16 on this CPU, or forced) bf16 / fp16 operands go through fp32 GEMMs instead of
// torch's bf16 ones: a is converted once, b a kTile x kTile tile at a time (each element once per call), the
// products summed over K in an fp32 (M, kTile) tile and rounded into out once, as a bf16 GEMM rounds its output.
inline void gemm_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, const at::Tensor& bias) {
  if (!fp32_tiles() || a.scalar_type() == at::kFloat) {
    if (bias.defined())
      at::addmm_out(out, bias, a, b);
    else
      at::mm_out(out, a, b);
    return;
  }
  constexpr int64_t kTile = 1024;
  const at::Tensor a32 = a.to(at::kFloat);
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  at::Tensor acc = at::empty({M * std::min(N, kTile)}, a32.options());
  for (int64_t j = 0; j < N; j += kTile) {
    const int64_t nb = std::min(kTile, N - j);
    at::Tensor c = acc.narrow(0, 0, M * nb).view({M, nb});
    for (int64_t k = 0; k < K; k += kTile) {
      const int64_t kb = std::min(kTile, K - k);
      const at::Tensor bt = b.narrow(0, k, kb).narrow(1, j, nb).to(at::kFloat);
      if (k == 0)
        at::mm_out(c, a32.narrow(1, k, kb), bt);
      else
        c.addmm_(a32.narrow(1, k, kb), bt);
    }
    if (bias.defined()) c.add_(bias.dim() == 1 ? bias.narrow(0, j, nb) : bias);
    out.narrow(1, j, nb).copy_(c);
  }
}

// The chunk's logits, (rows, V) in weight's dtype, written into buf.
inline void chunk_logits(at::Tensor& buf, const at::Tensor& h, const at::Tensor& weight, const at::Tensor& bias) {
  const at::Tensor hc = h.scalar_type() == weight.scalar_type() ? h : h.to(weight.scalar_type());
  gemm_out(buf, hc, weight.t(), bias);
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
