// linear_token_logprobs: log softmax((hidden @ weight.T + bias) / T)[target] a chunk of rows at a time.
//
// Each chunk's logits come from one BLAS GEMM (at::mm_out / at::addmm_out into a reused buffer), then the fused
// row pass of token_logprobs. Backward recomputes the chunk's logits, turns them into grad-logits (in place
// for fp32), then dH_chunk = G @ W and dW += G^T @ H_chunk in an fp32 accumulator. Rows whose target is
// ignore_index are dropped before the GEMMs (GRPO masks prompt tokens), so they cost nothing.
// Peak extra memory: O(chunk * V) (+ the fp32 dW accumulator when weight is bf16/fp16), never N x V.
#include <ATen/ATen.h>

#include <algorithm>
#include <tuple>

#include "ops.h"
#include "rows.h"

namespace gvu {
namespace {

// Rows per chunk by default: the fp32 chunk logits stay under 64 MiB, between 16 and 256 rows. Smaller chunks
// starve the GEMM: on this 2-core Sapphire Rapids (D=2048, V=32000, fp32) H @ W^T ran at 53 GFLOP/s with 16
// rows, 162 with 64, 248 with 256; G^T @ H at 16 / 86 / 164. So V=32000 gets 256 rows (33 MB), V=151936
// gets 104 rows (63 MB), against 2.4 GB for all 4096 x 151936 fp32 logits.
constexpr int64_t kChunkBytes = int64_t{64} << 20;

struct Rows {
  at::Tensor idx;  // (n,) int64 rows kept, or undefined when every row is kept
  int64_t n = 0;
};

Rows kept_rows(const at::Tensor& targets, int64_t ignore_index) {
  Rows r;
  const at::Tensor keep = targets.ne(ignore_index);
  r.n = keep.sum().item<int64_t>();
  if (r.n != targets.size(0)) r.idx = keep.nonzero().squeeze(1).contiguous();
  return r;
}

at::Tensor take(const at::Tensor& t, const Rows& rows) { return rows.idx.defined() ? t.index_select(0, rows.idx) : t; }

void check_inputs(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
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
void chunk_logits(at::Tensor& buf, const at::Tensor& h, const at::Tensor& weight, const at::Tensor& bias) {
  const at::Tensor hc = h.scalar_type() == weight.scalar_type() ? h : h.to(weight.scalar_type());
  if (bias.defined())
    at::addmm_out(buf, bias, hc, weight.t());
  else
    at::mm_out(buf, hc, weight.t());
}

at::Tensor bias_in(const c10::optional<at::Tensor>& bias, const at::Tensor& weight) {
  if (!bias.has_value() || !bias->defined()) return at::Tensor();
  return bias->to(weight.scalar_type()).contiguous();
}

}  // namespace

int64_t default_chunk_size(int64_t N, int64_t V) {
  const int64_t rows = kChunkBytes / (std::max<int64_t>(V, 1) * 4);
  const int64_t c = std::clamp<int64_t>(rows / 8 * 8, 16, 256);
  return std::max<int64_t>(1, std::min(c, N));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_token_logprobs_fwd(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets_in,
    const c10::optional<at::Tensor>& bias_opt, double temperature, int64_t ignore_index, bool return_entropy,
    int64_t chunk_size) {
  check_inputs(hidden, weight, targets_in, bias_opt);
  TORCH_CHECK(temperature > 0, "gvu_kernels: temperature must be > 0, got ", temperature);
  const int64_t N = hidden.size(0), V = weight.size(0);
  const at::Tensor targets = targets_in.to(at::kLong).contiguous();
  auto opts = hidden.options().dtype(at::kFloat);
  at::Tensor logp = at::zeros({N}, opts), lse = at::zeros({N}, opts);
  at::Tensor ent = at::zeros({return_entropy ? N : 0}, opts);
  if (N == 0) return {logp, lse, ent};
  check_targets(targets.data_ptr<int64_t>(), N, V, ignore_index);
  const Rows rows = kept_rows(targets, ignore_index);
  if (rows.n == 0) return {logp, lse, ent};
  const at::Tensor h = take(hidden, rows), t = take(targets, rows).contiguous();
  const at::Tensor bias = bias_in(bias_opt, weight);
  const int64_t C = chunk_size > 0 ? std::min(chunk_size, rows.n) : default_chunk_size(rows.n, V);
  at::Tensor buf = at::empty({C, V}, weight.options());
  // Outputs of the kept rows, scattered back at the end when rows were dropped.
  at::Tensor lp = rows.idx.defined() ? at::empty({rows.n}, opts) : logp;
  at::Tensor ls = rows.idx.defined() ? at::empty({rows.n}, opts) : lse;
  at::Tensor en = rows.idx.defined() && return_entropy ? at::empty({rows.n}, opts) : ent;
  const DType dt = dtype_of(weight);
  const float inv_t = static_cast<float>(1.0 / temperature);
  for (int64_t r0 = 0; r0 < rows.n; r0 += C) {
    const int64_t n = std::min(C, rows.n - r0);
    at::Tensor L = buf.narrow(0, 0, n);
    chunk_logits(L, h.narrow(0, r0, n), weight, bias);
    rows_forward(L.data_ptr(), dt, V, n, V, t.data_ptr<int64_t>() + r0, ignore_index, inv_t,
                 lp.data_ptr<float>() + r0, ls.data_ptr<float>() + r0,
                 return_entropy ? en.data_ptr<float>() + r0 : nullptr);
  }
  if (rows.idx.defined()) {
    logp.index_copy_(0, rows.idx, lp);
    lse.index_copy_(0, rows.idx, ls);
    if (return_entropy) ent.index_copy_(0, rows.idx, en);
  }
  return {logp, lse, ent};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_token_logprobs_bwd(
    const c10::optional<at::Tensor>& grad_logp, const c10::optional<at::Tensor>& grad_lse,
    const c10::optional<at::Tensor>& grad_entropy, const at::Tensor& hidden, const at::Tensor& weight,
    const at::Tensor& targets_in, const c10::optional<at::Tensor>& bias_opt, const at::Tensor& lse_in,
    const at::Tensor& entropy_in, double temperature, int64_t ignore_index, int64_t chunk_size,
    std::array<bool, 3> output_mask) {
  check_inputs(hidden, weight, targets_in, bias_opt);
  const int64_t N = hidden.size(0), D = hidden.size(1), V = weight.size(0);
  const bool has_bias = bias_opt.has_value() && bias_opt->defined();
  const bool need_h = output_mask[0], need_w = output_mask[1], need_b = output_mask[2] && has_bias;
  const auto f32 = hidden.options().dtype(at::kFloat);
  at::Tensor dH = need_h ? at::zeros({N, D}, hidden.options()) : at::empty({0}, hidden.options());
  // fp32 weights accumulate straight into the returned gradient; bf16/fp16 ones into an fp32 buffer cast once
  // at the end (accumulating per-chunk products in bf16 is the precision bug Liger users reported).
  const bool w32 = weight.scalar_type() == at::kFloat;
  at::Tensor dW32 = need_w ? at::zeros({V, D}, f32) : at::Tensor();
  at::Tensor db32 = need_b ? at::zeros({V}, f32) : at::Tensor();
  auto finish = [&]() -> std::tuple<at::Tensor, at::Tensor, at::Tensor> {
    at::Tensor dW = need_w ? (w32 ? dW32 : dW32.to(weight.scalar_type())) : at::empty({0}, weight.options());
    at::Tensor db = need_b ? db32.to(bias_opt->scalar_type()) : at::empty({0}, weight.options());
    return {dH, dW, db};
  };
  const bool any_grad = (grad_logp.has_value() && grad_logp->defined()) ||
                        (grad_lse.has_value() && grad_lse->defined()) ||
                        (grad_entropy.has_value() && grad_entropy->defined());
  if (N == 0 || !(need_h || need_w || need_b) || !any_grad) return finish();
  const at::Tensor targets = targets_in.to(at::kLong).contiguous();
  const Rows rows = kept_rows(targets, ignore_index);
  if (rows.n == 0) return finish();

  auto kept_f32 = [&](const c10::optional<at::Tensor>& g) {
    if (!g.has_value() || !g->defined()) return at::Tensor();
    TORCH_CHECK(g->numel() == N, "gvu_kernels: output gradients must have ", N, " elements, got ", g->sizes());
    return take(g->to(at::kFloat).reshape({N}), rows).contiguous();
  };
  const at::Tensor gl = kept_f32(grad_logp), gs = kept_f32(grad_lse), ge = kept_f32(grad_entropy);
  const at::Tensor lse = take(lse_in.to(at::kFloat), rows).contiguous();
  const at::Tensor ent = ge.defined() ? take(entropy_in.to(at::kFloat), rows).contiguous() : at::Tensor();
  const at::Tensor h = take(hidden, rows), t = take(targets, rows).contiguous();
  const at::Tensor bias = bias_in(bias_opt, weight);
  const int64_t C = chunk_size > 0 ? std::min(chunk_size, rows.n) : default_chunk_size(rows.n, V);
  const DType dt = dtype_of(weight);
  const float inv_t = static_cast<float>(1.0 / temperature);

  at::Tensor buf = at::empty({C, V}, weight.options());
  // bf16/fp16: grad-logits in fp32 for the fp32 dW/db accumulation, plus a copy in weight's dtype for the
  // dH GEMM (oneDNN bf16 GEMM accumulates in fp32 internally). fp32: G overwrites the logits in place.
  at::Tensor g32 = w32 ? buf : at::empty({C, V}, f32);
  at::Tensor glow = (!w32 && need_h) ? at::empty({C, V}, weight.options()) : at::Tensor();
  at::Tensor dHk = (need_h && rows.idx.defined()) ? at::empty({rows.n, D}, hidden.options()) : dH;
  auto ptr = [](const at::Tensor& x, int64_t off) { return x.defined() ? x.data_ptr<float>() + off : nullptr; };

  for (int64_t r0 = 0; r0 < rows.n; r0 += C) {
    const int64_t n = std::min(C, rows.n - r0);
    const at::Tensor hc = h.narrow(0, r0, n);
    at::Tensor L = buf.narrow(0, 0, n);
    at::Tensor G = g32.narrow(0, 0, n);
    chunk_logits(L, hc, weight, bias);
    rows_backward(L.data_ptr(), dt, V, G.data_ptr(), DType::F32, V, n, V, t.data_ptr<int64_t>() + r0,
                  ignore_index, inv_t, ptr(gl, r0), ptr(gs, r0), ptr(ge, r0), lse.data_ptr<float>() + r0,
                  ptr(ent, r0));
    if (need_h) {
      at::Tensor out = dHk.narrow(0, r0, n);
      const at::Tensor Gm = w32 ? G : glow.narrow(0, 0, n).copy_(G);
      if (out.scalar_type() == weight.scalar_type())
        at::mm_out(out, Gm, weight);
      else
        out.copy_(at::mm(Gm, weight));
    }
    if (need_w) dW32.addmm_(G.t(), hc.scalar_type() == at::kFloat ? hc : hc.to(at::kFloat));
    if (need_b) db32.add_(G.sum(0));
  }
  if (need_h && rows.idx.defined()) dH.index_copy_(0, rows.idx, dHk);
  return finish();
}

}  // namespace gvu
