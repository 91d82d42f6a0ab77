// token_logprobs: log softmax(logits / T)[target] (+ entropy) for logits already in memory.
//
// Forward reads each row once and writes five fp32 numbers per row (logp, lse, entropy, and the row max m and
// log s that the backward uses instead of lse: exp((z - m) - log s) keeps p exact at |z| ~ 1e4, where exp(z - lse)
// lost |lse| * 2^-24 in the exponent). Extra memory is O(N) (no second N x V buffer). Backward reads the logits
// once more and writes the gradient in logits' dtype.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "rows.h"

namespace gvu {
namespace {

at::Tensor rows_view(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2, "gvu_kernels: logits must be (N, V), got ", logits.sizes());
  TORCH_CHECK(logits.device().is_cpu(), "gvu_kernels: CPU op got a tensor on ", logits.device());
  // Unit column stride is what the SIMD loops need; any row stride (e.g. a slice of a wider tensor) is fine.
  return logits.stride(1) == 1 ? logits : logits.contiguous();
}

at::Tensor as_f32(const c10::optional<at::Tensor>& t, int64_t n, const char* name) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  TORCH_CHECK(t->numel() == n, "gvu_kernels: ", name, " must have ", n, " elements, got ", t->sizes());
  return t->to(at::kFloat).contiguous();
}

const float* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> token_logprobs_fwd(const at::Tensor& logits_in,
                                                                   const at::Tensor& targets_in, double temperature,
                                                                   int64_t ignore_index, bool return_entropy) {
  const at::Tensor logits = rows_view(logits_in);
  TORCH_CHECK(temperature > 0, "gvu_kernels: temperature must be > 0, got ", temperature);
  const int64_t N = logits.size(0), V = logits.size(1);
  TORCH_CHECK(targets_in.dim() == 1 && targets_in.size(0) == N, "gvu_kernels: targets must be (", N, ",), got ",
              targets_in.sizes());
  const at::Tensor targets = targets_in.to(at::kLong).contiguous();
  const DType dt = dtype_of(logits);
  auto opts = logits.options().dtype(at::kFloat);
  at::Tensor logp = at::empty({N}, opts), lse = at::empty({N}, opts);
  at::Tensor ent = at::empty({return_entropy ? N : 0}, opts);
  at::Tensor stats = at::empty({N, 2}, opts);  // (m, log s) per row: the backward's exact form of lse
  if (N == 0) return {logp, lse, ent, stats};
  TORCH_CHECK(V > 0, "gvu_kernels: logits need V >= 1");
  check_targets(targets.data_ptr<int64_t>(), N, V, ignore_index);
  rows_forward(logits.data_ptr(), dt, logits.stride(0), N, V, targets.data_ptr<int64_t>(), ignore_index,
               static_cast<float>(1.0 / temperature), logp.data_ptr<float>(), lse.data_ptr<float>(),
               return_entropy ? ent.data_ptr<float>() : nullptr, stats.data_ptr<float>());
  return {logp, lse, ent, stats};
}

at::Tensor token_logprobs_bwd(const c10::optional<at::Tensor>& grad_logp, const c10::optional<at::Tensor>& grad_lse,
                              const c10::optional<at::Tensor>& grad_entropy, const at::Tensor& logits_in,
                              const at::Tensor& targets_in, const at::Tensor& stats_in, const at::Tensor& entropy_in,
                              double temperature, int64_t ignore_index, int64_t reuse_bytes) {
  const at::Tensor logits = rows_view(logits_in);
  const int64_t N = logits.size(0), V = logits.size(1);
  bool fresh = true;
  at::Tensor grad = reusable_rows(Reuse::TokenGrad, N, V, logits.options(), reuse_bytes, &fresh);
  if (N == 0) return grad;
  // A fresh N x V gradient's first touch (page faults + zeroing) is a large part of the backward, hence
  // reusable_rows; where it must be fresh: 4096 x 32000 fp32 took 0.92 s with 4 KiB pages, 0.30 s with 2 MiB ones.
  // But on one VM the first huge-page allocation in a process cost 3.5 s (vs 0.9 s) for 1.2 GB, so huge pages are
  // opt-in (GVU_KERNELS_THP=1), like torch's own THP_MEM_ALLOC_ENABLE.
  if (fresh && huge_pages_enabled()) advise_huge_pages(grad.data_ptr(), grad.nbytes());
  const at::Tensor targets = targets_in.to(at::kLong).contiguous();
  const at::Tensor gl = as_f32(grad_logp, N, "grad_logp"), gs = as_f32(grad_lse, N, "grad_lse");
  at::Tensor ge = as_f32(grad_entropy, N, "grad_entropy");
  at::Tensor ent;
  if (ge.defined()) {
    TORCH_CHECK(entropy_in.numel() == N, "gvu_kernels: a gradient for the entropy needs the forward's entropy");
    ent = entropy_in.to(at::kFloat).contiguous();
  }
  TORCH_CHECK(stats_in.numel() == 2 * N, "gvu_kernels: stats must be the forward's (", N, ", 2), got ",
              stats_in.sizes());
  const at::Tensor stats = stats_in.to(at::kFloat).contiguous();
  const DType dt = dtype_of(logits);
  rows_backward(logits.data_ptr(), dt, logits.stride(0), grad.data_ptr(), dt, V, N, V, targets.data_ptr<int64_t>(),
                ignore_index, static_cast<float>(1.0 / temperature), ptr_or_null(gl), ptr_or_null(gs),
                ptr_or_null(ge), stats.data_ptr<float>(), ptr_or_null(ent));
  return grad;
}

}  // namespace gvu

// Schemas and CPU implementations of this op (a fragment of the gvu_kernels library: each op registers its
// own, as kernels/cpp_ops/<op>.py registers its fake kernels and autograd).
TORCH_LIBRARY_FRAGMENT(gvu_kernels, m) {
  m.def(
      "token_logprobs(Tensor logits, Tensor targets, float temperature, int ignore_index, bool return_entropy)"
      " -> (Tensor logp, Tensor lse, Tensor entropy, Tensor stats)");
  m.def(
      "token_logprobs_backward(Tensor? grad_logp, Tensor? grad_lse, Tensor? grad_entropy, Tensor logits,"
      " Tensor targets, Tensor stats, Tensor entropy, float temperature, int ignore_index,"
      " int reuse_bytes=0) -> Tensor");
}

TORCH_LIBRARY_IMPL(gvu_kernels, CPU, m) {
  m.impl("token_logprobs", &gvu::token_logprobs_fwd);
  m.impl("token_logprobs_backward", &gvu::token_logprobs_bwd);
}
