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
// torch's bf16 ones: a is converted once, b a tile of <= 16 MB fp32 at a time (each element once per call), cut
// along its storage order so every conversion reads contiguous memory (a transposing bf16 -> fp32 copy ran at
// ~1.4 GB/s here): a transposed b (W^T, H^T) in column blocks, written straight to out's columns; a row-major b
// (W, H) in row blocks over K, summed in an fp32 (M, N) tile. Rounded into out once, as a bf16 GEMM rounds.
inline void gemm_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, const at::Tensor& bias) {
  if (!fp32_tiles() || (a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat)) {
    if (bias.defined())
      at::addmm_out(out, bias, a, b);
    else
      at::mm_out(out, a, b);
    return;
  }
  constexpr int64_t kTileElems = int64_t{4} << 20;  // 16 MB of fp32
  const at::Tensor a32 = a.to(at::kFloat);
  const int64_t K = a.size(1), N = b.size(1);
  if (b.stride(0) == 1) {  // b = X^T, X row-major: blocks of X's rows are b's column blocks
    const int64_t nb = std::max<int64_t>(16, kTileElems / std::max<int64_t>(K, 1));
    for (int64_t j = 0; j < N; j += nb) {
      const int64_t w = std::min(nb, N - j);
      at::Tensor c = at::mm(a32, b.narrow(1, j, w).to(at::kFloat));
      if (bias.defined()) c.add_(bias.dim() == 1 ? bias.narrow(0, j, w) : bias);
      out.narrow(1, j, w).copy_(c);
    }
    return;
  }
  const int64_t kb = std::max<int64_t>(16, kTileElems / std::max<int64_t>(N, 1));
  at::Tensor acc;
  for (int64_t k = 0; k < K; k += kb) {
    const int64_t h = std::min(kb, K - k);
    const at::Tensor bt = b.narrow(0, k, h).to(at::kFloat);
    if (k == 0)
      acc = at::mm(a32.narrow(1, k, h), bt);
    else
      acc.addmm_(a32.narrow(1, k, h), bt);
  }
  if (bias.defined()) acc.add_(bias);
  out.copy_(acc);
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

// The same from the saved forward's logits (n_kept or more rows, V): no recompute.
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_token_logprobs_saved_bwd(
    const c10::optional<at::Tensor>& grad_logp, const c10::optional<at::Tensor>& grad_lse,
    const c10::optional<at::Tensor>& grad_entropy, const at::Tensor& logits, const at::Tensor& hidden,
    const at::Tensor& weight, const at::Tensor& targets, const c10::optional<at::Tensor>& bias,
    const at::Tensor& lse, const at::Tensor& entropy, double temperature, int64_t ignore_index, int64_t chunk_size,
    std::array<bool, 3> output_mask);

}  // namespace gvu
