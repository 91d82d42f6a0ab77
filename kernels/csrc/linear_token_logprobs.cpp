// linear_token_logprobs: log softmax((hidden @ weight.T + bias) / T)[target] a chunk of rows at a time.
//
// Forward: each chunk's logits come from one GEMM (gemm_out into a reused buffer), then the fused row pass of
// token_logprobs; when hidden needs a gradient also the (N, D) sums of its backward (see forward_impl). The
// recompute backward (linear_backward.cpp) gives dW / db and dH from V-blocks of recomputed logits; the saved
// forward (linear_token_logprobs_saved) keeps the logits instead, for a backward with no recompute.
// Rows whose target is ignore_index are dropped before the GEMMs (GRPO masks prompt tokens), so they cost
// nothing. Peak extra memory: O(chunk * V) forward, O(64 MiB tile + N * D) backward, never N x V (except the
// saved forward's output, which its caller sized against a budget).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <limits>
#include <tuple>

#include "linear_common.h"

namespace gvu {

// Rows per forward chunk: its logits (row_bytes = V x element size, x 2 with the entropy rows) stay under 64 MiB,
// between 16 and 1024 rows. Bigger chunks feed the GEMMs better: on this 2-core Sapphire Rapids (D=1024, V=32000,
// bf16, AMX) H @ W^T ran at 1627 / 1901 / 1967 GFLOP/s with 256 / 512 / 1024 rows and the (p - onehot) @ W of the
// sums at 1731 / 2055 / 2207 (best of 5; fp32: ~280 -> ~350). So bf16 at V=32000 gets 1024 rows (65 MB), fp32 520,
// V=151936 bf16 216, against 2.4 GB for all 4096 x 151936 fp32 logits.
int64_t chunk_rows(int64_t N, int64_t row_bytes) {
  const int64_t c = std::clamp<int64_t>(kChunkBytes / std::max<int64_t>(row_bytes, 1) / 8 * 8, 16, 1024);
  return std::max<int64_t>(1, std::min(c, N));
}

int64_t default_chunk_size(int64_t N, int64_t V) { return chunk_rows(N, V * 4); }

namespace {

// The forward of both ops. With `expected`, also the two (N, D) sums the frozen-weight backward needs:
//   cen[n] = sum_j (p_nj - onehot(t_n)_j) W_j        = E_n - W[t_n]        (E_n = sum_j p_nj W_j)
//   ent_dir[n] = sum_j p_nj (log p_nj + H_n) W_j     = F_n + H_n E_n       (F_n = sum_j p_nj log p_nj W_j)
// so dH_n = (-g_logp cen + g_lse (cen + W[t]) - g_ent ent_dir) / T needs no logits. Both are formed the way the
// recompute backward forms dH: the row kernel writes the chunk's (p - onehot) (and p (log p + H)) over the
// logits tile (the coefficients of each row sum to zero, so the W_t - E cancellation happens inside the GEMM's
// fp32 accumulation, not on two rounded N x D tensors), then one GEMM (n or 2n rows) x W gives them.
// With `save`, the logits themselves: (N, V) in the chunk buffer's dtype, the kept rows in order in [0, n_kept),
// zeros below; each chunk's GEMM writes straight into its rows, so saving costs no copy.
struct FwdOut {
  at::Tensor logp, lse, ent, cen, ent_dir, logits;
};

FwdOut forward_impl(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets_in,
                    const c10::optional<at::Tensor>& bias_opt, double temperature, int64_t ignore_index,
                    bool return_entropy, int64_t chunk_size, bool expected, bool save = false,
                    int64_t reuse_bytes = 0) {
  check_inputs(hidden, weight, targets_in, bias_opt);
  TORCH_CHECK(temperature > 0, "gvu_kernels: temperature must be > 0, got ", temperature);
  const int64_t N = hidden.size(0), D = hidden.size(1), V = weight.size(0);
  const at::Tensor targets = targets_in.to(at::kLong).contiguous();
  auto opts = hidden.options().dtype(at::kFloat);
  FwdOut o;
  o.logp = at::zeros({N}, opts);
  o.lse = at::zeros({N}, opts);
  o.ent = at::zeros({return_entropy ? N : 0}, opts);
  o.cen = at::zeros({expected ? N : 0, expected ? D : 0}, weight.options());
  o.ent_dir = at::zeros({expected && return_entropy ? N : 0, expected && return_entropy ? D : 0}, weight.options());
  // The logits chunk: in weight's dtype (as its GEMM writes it), fp32 when the products run in fp32 tiles.
  const bool f32 = fp32_tiles() && weight.scalar_type() != at::kFloat;
  const auto ldt = weight.options().dtype(f32 ? at::kFloat : weight.scalar_type());
  bool fresh = true;  // saved logits: the GEMMs overwrite the kept rows and the ignored ones are zeroed below
  o.logits = save ? reusable_rows(Reuse::SavedLogits, N, V, ldt, reuse_bytes, &fresh) : at::empty({0, V}, ldt);
  if (N == 0) return o;
  check_targets(targets.data_ptr<int64_t>(), N, V, ignore_index);
  const Rows rows = kept_rows(targets, ignore_index);
  if (save && rows.n < N) o.logits.narrow(0, rows.n, N - rows.n).zero_();
  if (rows.n == 0) return o;
  const at::Tensor h = take(hidden, rows), t = take(targets, rows).contiguous();
  const at::Tensor bias = bias_in(bias_opt, weight);
  const bool two = expected && return_entropy;  // the chunk's p (log p + H) rows sit below its logits rows
  const int64_t C = chunk_size > 0 ? std::min(chunk_size, rows.n)
                                   : chunk_rows(rows.n, V * weight.element_size() * (two ? 2 : 1));
  at::Tensor buf = save ? o.logits : at::empty({two ? 2 * C : C, V}, ldt);
  // Outputs of the kept rows, scattered back at the end when rows were dropped.
  const bool scatter = rows.idx.defined();
  at::Tensor lp = scatter ? at::empty({rows.n}, opts) : o.logp;
  at::Tensor ls = scatter ? at::empty({rows.n}, opts) : o.lse;
  at::Tensor en = scatter && return_entropy ? at::empty({rows.n}, opts) : o.ent;
  at::Tensor cen = expected && scatter ? at::empty({rows.n, D}, weight.options()) : o.cen;
  at::Tensor edir = two && scatter ? at::empty({rows.n, D}, weight.options()) : o.ent_dir;
  at::Tensor sums = expected ? at::empty({two ? 2 * C : C, D}, weight.options()) : at::Tensor();
  // Per-row coefficients for rows_backward: g_logp = -T gives p - onehot, g_ent = -T gives p (log p + H).
  const at::Tensor minus_t = at::full({C}, -temperature, opts);
  at::Tensor stats = expected ? at::empty({C, 2}, opts) : at::Tensor();
  constexpr int64_t kNoIgnore = std::numeric_limits<int64_t>::min();
  const DType dt = dtype_of(buf);
  const float inv_t = static_cast<float>(1.0 / temperature);
  for (int64_t r0 = 0; r0 < rows.n; r0 += C) {
    const int64_t n = std::min(C, rows.n - r0);
    at::Tensor L = buf.narrow(0, save ? r0 : 0, n);
    chunk_logits(L, h.narrow(0, r0, n), weight, bias);
    const int64_t* tr = t.data_ptr<int64_t>() + r0;
    float* st = expected ? stats.data_ptr<float>() : nullptr;  // this chunk's (m, log s)
    rows_forward(L.data_ptr(), dt, V, n, V, tr, ignore_index, inv_t, lp.data_ptr<float>() + r0,
                 ls.data_ptr<float>() + r0, return_entropy ? en.data_ptr<float>() + r0 : nullptr, st);
    if (!expected) continue;
    const float* mt = minus_t.data_ptr<float>();
    if (two)  // first, while the logits are intact: p (log p + H) into rows [n, 2n)
      rows_backward(L.data_ptr(), dt, V, buf.narrow(0, n, n).data_ptr(), dt, V, n, V, tr, kNoIgnore, inv_t, nullptr,
                    nullptr, mt, st, en.data_ptr<float>() + r0);
    rows_backward(L.data_ptr(), dt, V, L.data_ptr(), dt, V, n, V, tr, kNoIgnore, inv_t, mt, nullptr, nullptr, st,
                  nullptr);  // p - onehot, in place
    at::Tensor S = sums.narrow(0, 0, two ? 2 * n : n);
    gemm_out(S, buf.narrow(0, 0, two ? 2 * n : n), weight, at::Tensor());
    cen.narrow(0, r0, n).copy_(S.narrow(0, 0, n));
    if (two) edir.narrow(0, r0, n).copy_(S.narrow(0, n, n));
  }
  if (scatter) {
    o.logp.index_copy_(0, rows.idx, lp);
    o.lse.index_copy_(0, rows.idx, ls);
    if (return_entropy) o.ent.index_copy_(0, rows.idx, en);
    if (expected) o.cen.index_copy_(0, rows.idx, cen);
    if (two) o.ent_dir.index_copy_(0, rows.idx, edir);
  }
  return o;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_token_logprobs_fwd(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
    const c10::optional<at::Tensor>& bias, double temperature, int64_t ignore_index, bool return_entropy,
    int64_t chunk_size) {
  FwdOut o = forward_impl(hidden, weight, targets, bias, temperature, ignore_index, return_entropy, chunk_size,
                          false);
  return {o.logp, o.lse, o.ent};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_token_logprobs_frozen_fwd(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
    const c10::optional<at::Tensor>& bias, double temperature, int64_t ignore_index, bool return_entropy,
    int64_t chunk_size) {
  FwdOut o = forward_impl(hidden, weight, targets, bias, temperature, ignore_index, return_entropy, chunk_size,
                          true);
  return {o.logp, o.lse, o.ent, o.cen, o.ent_dir};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_token_logprobs_saved_fwd(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
    const c10::optional<at::Tensor>& bias, double temperature, int64_t ignore_index, bool return_entropy,
    int64_t chunk_size, int64_t reuse_bytes) {
  FwdOut o = forward_impl(hidden, weight, targets, bias, temperature, ignore_index, return_entropy, chunk_size,
                          false, true, reuse_bytes);
  return {o.logp, o.lse, o.ent, o.logits};
}

}  // namespace gvu

// Schemas and CPU implementations of this op (a fragment of the gvu_kernels library: each op registers its
// own, as kernels/cpp_ops/<op>.py registers its fake kernels and autograd).
TORCH_LIBRARY_FRAGMENT(gvu_kernels, m) {
  m.def(
      "linear_token_logprobs(Tensor hidden, Tensor weight, Tensor targets, Tensor? bias, float temperature,"
      " int ignore_index, bool return_entropy, int chunk_size) -> (Tensor logp, Tensor lse, Tensor entropy)");
  // The same forward for a frozen head (hidden needs a gradient, weight and bias do not): also returns
  // cen = E - W[t] and ent_dir = F + H E, (N, D) in weight's dtype (ent_dir (0, 0) without entropy), from which
  // the backward forms dH without recomputing logits.
  m.def(
      "linear_token_logprobs_frozen(Tensor hidden, Tensor weight, Tensor targets, Tensor? bias, float temperature,"
      " int ignore_index, bool return_entropy, int chunk_size) -> (Tensor logp, Tensor lse, Tensor entropy,"
      " Tensor cen, Tensor ent_dir)");
  // The same forward that also returns its logits (N, V) (kept rows first, in order; weight's dtype, fp32 in fp32
  // tiles) for linear_token_logprobs_saved_backward: a trainable head's backward with no recompute, when the
  // caller's memory budget allows N x V.
  m.def(
      "linear_token_logprobs_saved(Tensor hidden, Tensor weight, Tensor targets, Tensor? bias, float temperature,"
      " int ignore_index, bool return_entropy, int chunk_size, int reuse_bytes=0) -> (Tensor logp, Tensor lse,"
      " Tensor entropy, Tensor logits)");
  m.def(
      "linear_token_logprobs_backward(Tensor? grad_logp, Tensor? grad_lse, Tensor? grad_entropy, Tensor hidden,"
      " Tensor weight, Tensor targets, Tensor? bias, Tensor lse, Tensor entropy, float temperature,"
      " int ignore_index, int chunk_size, bool[3] output_mask) -> (Tensor grad_hidden, Tensor grad_weight,"
      " Tensor grad_bias)");
  m.def(
      "linear_token_logprobs_saved_backward(Tensor? grad_logp, Tensor? grad_lse, Tensor? grad_entropy,"
      " Tensor logits, Tensor hidden, Tensor weight, Tensor targets, Tensor? bias, Tensor lse, Tensor entropy,"
      " float temperature, int ignore_index, int chunk_size, bool[3] output_mask) -> (Tensor grad_hidden,"
      " Tensor grad_weight, Tensor grad_bias)");
  m.def("default_chunk_size(int n, int v) -> int", &gvu::default_chunk_size);  // for tests and the benchmark
}

TORCH_LIBRARY_IMPL(gvu_kernels, CPU, m) {
  m.impl("linear_token_logprobs", &gvu::linear_token_logprobs_fwd);
  m.impl("linear_token_logprobs_frozen", &gvu::linear_token_logprobs_frozen_fwd);
  m.impl("linear_token_logprobs_saved", &gvu::linear_token_logprobs_saved_fwd);
  m.impl("linear_token_logprobs_backward", &gvu::linear_token_logprobs_bwd);
  m.impl("linear_token_logprobs_saved_backward", &gvu::linear_token_logprobs_saved_bwd);
}
