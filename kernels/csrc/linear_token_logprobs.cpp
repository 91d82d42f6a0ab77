// linear_token_logprobs: log softmax((hidden @ weight.T + bias) / T)[target] a chunk of rows at a time.
//
// Forward: each chunk's logits come from one BLAS GEMM (at::mm_out / at::addmm_out into a reused buffer), then
// the fused row pass of token_logprobs. Backward recomputes the logits a V-block at a time over all rows, turns
// each tile into grad-logits in place, then dW_block = G^T @ H (one GEMM, rounded once) and dH += G @ W_block
// (fp32 across blocks). Rows whose target is ignore_index are dropped before the GEMMs (GRPO masks prompt
// tokens), so they cost nothing. Peak extra memory: O(chunk * V) forward, O(64 MiB tile + N * D) backward,
// never N x V.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <limits>
#include <tuple>

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

namespace {

// The forward of both ops. With `expected`, also the two (N, D) sums the frozen-weight backward needs:
//   cen[n] = sum_j (p_nj - onehot(t_n)_j) W_j        = E_n - W[t_n]        (E_n = sum_j p_nj W_j)
//   ent_dir[n] = sum_j p_nj (log p_nj + H_n) W_j     = F_n + H_n E_n       (F_n = sum_j p_nj log p_nj W_j)
// so dH_n = (-g_logp cen + g_lse (cen + W[t]) - g_ent ent_dir) / T needs no logits. Both are formed the way the
// recompute backward forms dH: the row kernel writes the chunk's (p - onehot) (and p (log p + H)) over the
// logits tile (the coefficients of each row sum to zero, so the W_t - E cancellation happens inside the GEMM's
// fp32 accumulation, not on two rounded N x D tensors), then one GEMM (n or 2n rows) x W gives them.
struct FwdOut {
  at::Tensor logp, lse, ent, cen, ent_dir;
};

FwdOut forward_impl(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets_in,
                    const c10::optional<at::Tensor>& bias_opt, double temperature, int64_t ignore_index,
                    bool return_entropy, int64_t chunk_size, bool expected) {
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
  if (N == 0) return o;
  check_targets(targets.data_ptr<int64_t>(), N, V, ignore_index);
  const Rows rows = kept_rows(targets, ignore_index);
  if (rows.n == 0) return o;
  const at::Tensor h = take(hidden, rows), t = take(targets, rows).contiguous();
  const at::Tensor bias = bias_in(bias_opt, weight);
  const int64_t C = chunk_size > 0 ? std::min(chunk_size, rows.n) : default_chunk_size(rows.n, V);
  const bool two = expected && return_entropy;  // the chunk's p (log p + H) rows sit below its logits rows
  at::Tensor buf = at::empty({two ? 2 * C : C, V}, weight.options());
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
  const DType dt = dtype_of(weight);
  const float inv_t = static_cast<float>(1.0 / temperature);
  for (int64_t r0 = 0; r0 < rows.n; r0 += C) {
    const int64_t n = std::min(C, rows.n - r0);
    at::Tensor L = buf.narrow(0, 0, n);
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
    at::mm_out(S, buf.narrow(0, 0, two ? 2 * n : n), weight);
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
  const bool w32 = weight.scalar_type() == at::kFloat;
  // The tile loop writes every row of dW; the early returns below zero it.
  at::Tensor dW = need_w ? at::empty({V, D}, weight.options()) : at::empty({0}, weight.options());
  at::Tensor db32 = need_b ? at::zeros({V}, f32) : at::Tensor();
  auto finish = [&](const at::Tensor& dH, bool dw_written = true) -> std::tuple<at::Tensor, at::Tensor, at::Tensor> {
    if (need_w && !dw_written) dW.zero_();
    at::Tensor db = need_b ? db32.to(bias_opt->scalar_type()) : at::empty({0}, weight.options());
    return {dH, dW, db};
  };
  const at::Tensor no_dH = need_h ? at::zeros({N, D}, hidden.options()) : at::empty({0}, hidden.options());
  const bool any_grad = (grad_logp.has_value() && grad_logp->defined()) ||
                        (grad_lse.has_value() && grad_lse->defined()) ||
                        (grad_entropy.has_value() && grad_entropy->defined());
  if (N == 0 || !(need_h || need_w || need_b) || !any_grad) return finish(no_dH, false);
  const at::Tensor targets = targets_in.to(at::kLong).contiguous();
  const Rows rows = kept_rows(targets, ignore_index);
  if (rows.n == 0) return finish(no_dH, false);

  auto kept_f32 = [&](const c10::optional<at::Tensor>& g) {
    if (!g.has_value() || !g->defined()) return at::Tensor();
    TORCH_CHECK(g->numel() == N, "gvu_kernels: output gradients must have ", N, " elements, got ", g->sizes());
    return take(g->to(at::kFloat).reshape({N}), rows).contiguous();
  };
  const at::Tensor gl = kept_f32(grad_logp), gs = kept_f32(grad_lse), ge = kept_f32(grad_entropy);
  // (m, log s) = (lse, 0): only lse is saved, so p = exp(z - lse) here (1e-3 relative error in p at |z| ~ 2e4,
  // far below what a bf16 GEMM's logits carry; the token op saves the exact pair).
  const at::Tensor lse = take(lse_in.to(at::kFloat), rows);
  const at::Tensor stats = at::stack({lse, at::zeros_like(lse)}, 1).contiguous();
  const at::Tensor ent = ge.defined() ? take(entropy_in.to(at::kFloat), rows).contiguous() : at::Tensor();
  const at::Tensor h = take(hidden, rows);
  const at::Tensor hw = h.scalar_type() == weight.scalar_type() ? h : h.to(weight.scalar_type()).contiguous();
  const at::Tensor t = take(targets, rows).contiguous();
  const at::Tensor bias = bias_in(bias_opt, weight);
  const DType dt = dtype_of(weight);
  const float inv_t = static_cast<float>(1.0 / temperature);

  // Tiles of (C rows) x (Vb vocab columns), V-blocks outermost, all kept rows in one chunk unless they exceed the
  // 64 MiB budget at Vb = 1024 (C < n only past ~32k bf16 rows, or when chunk_size asks). Per tile:
  // L = H Wb^T (weight's dtype), G = grad-logits written over L in place (in weight's dtype, as eager autograd's
  // grad-logits are), then
  //   dW[block] = G^T H      one GEMM with K = all rows: fp32 accumulation inside BLAS, rounded once to the
  //                          weight's dtype like eager's; no V x D fp32 buffer (a full fp32 dW is 2x the weight,
  //                          1.2 GB at 151936 x 2048), and bf16/fp16 GEMMs stay on the fast AMX/AVX512-BF16 path
  //                          (an fp32 G^T H ran at ~1/4 the rate of the bf16 GEMMs around it on this CPU);
  //   dH32 += G Wb           fp32 accumulation across V-blocks (N x D, small).
  // The forward's lse and entropy make every tile's grad-logits computable on its own.
  const size_t es = weight.element_size();
  const int64_t n = rows.n;
  const int64_t Vb = std::min<int64_t>(V, std::clamp<int64_t>(kChunkBytes / (n * static_cast<int64_t>(es)) / 256 * 256,
                                                         1024, 8192));
  const int64_t C = chunk_size > 0 ? std::min(chunk_size, n)
                                   : std::min<int64_t>(n, std::max<int64_t>(16, kChunkBytes / (Vb * es)));
  // bf16/fp16 weights with rows over several chunks: each chunk's grad-logits stay fp32 and dW sums the chunks
  // in an fp32 (Vb, D) accumulator (fp32 GEMM, slower), so dW is still rounded once, not once per chunk.
  const bool split_w = need_w && !w32 && C < n;
  at::Tensor dH32 = need_h ? at::zeros({n, D}, f32) : at::Tensor();
  at::Tensor buf = at::empty({C, Vb}, weight.options());
  // bf16/fp16: dH's per-tile partial, before its fp32 add, in slices of kDhRows rows (a C x D buffer was 32 MB,
  // a tenth of the whole backward's extra memory, at N=8192, D=2048).
  constexpr int64_t kDhRows = 1024;
  at::Tensor dHpart = (need_h && !w32) ? at::empty({std::min(C, kDhRows), D}, weight.options()) : at::Tensor();
  at::Tensor g32 = split_w ? at::empty({C, Vb}, f32) : at::Tensor();
  at::Tensor h32 = split_w ? hw.to(at::kFloat) : at::Tensor();
  at::Tensor dWb32 = split_w ? at::empty({Vb, D}, f32) : at::Tensor();
  at::Tensor tshift = at::empty_like(t);
  auto ptr = [](const at::Tensor& x, int64_t off) { return x.defined() ? x.data_ptr<float>() + off : nullptr; };
  // No kept row is ignored; a sentinel no target can equal, since shifted targets may be negative.
  constexpr int64_t kNoIgnore = std::numeric_limits<int64_t>::min();

  for (int64_t v0 = 0; v0 < V; v0 += Vb) {
    const int64_t vb = std::min(Vb, V - v0);
    const at::Tensor Wb = weight.narrow(0, v0, vb);
    const at::Tensor bb = bias.defined() ? bias.narrow(0, v0, vb) : at::Tensor();
    at::Tensor dWb = need_w ? dW.narrow(0, v0, vb) : at::Tensor();
    if (split_w) dWb32.narrow(0, 0, vb).zero_();
    at::sub_out(tshift, t, v0);  // targets relative to the block; outside [0, vb) means no one-hot here
    for (int64_t r0 = 0; r0 < n; r0 += C) {
      const int64_t m = std::min(C, n - r0);
      at::Tensor G = buf.narrow(0, 0, m).narrow(1, 0, vb);  // logits, then grad-logits in place
      const at::Tensor Hc = hw.narrow(0, r0, m);
      chunk_logits(G, Hc, Wb, bb);
      at::Tensor G32 = split_w ? g32.narrow(0, 0, m).narrow(1, 0, vb) : G;
      rows_backward(G.data_ptr(), dt, G.stride(0), G32.data_ptr(), split_w ? DType::F32 : dt, G32.stride(0), m, vb,
                    tshift.data_ptr<int64_t>() + r0, kNoIgnore, inv_t, ptr(gl, r0), ptr(gs, r0), ptr(ge, r0),
                    stats.data_ptr<float>() + 2 * r0, ptr(ent, r0));
      if (split_w && need_h) G.copy_(G32);
      if (need_h) {
        at::Tensor acc = dH32.narrow(0, r0, m);
        if (w32) {
          acc.addmm_(G, Wb);
        } else {
          for (int64_t i = 0; i < m; i += kDhRows) {
            const int64_t k = std::min(kDhRows, m - i);
            at::Tensor part = dHpart.narrow(0, 0, k);
            at::mm_out(part, G.narrow(0, i, k), Wb);
            acc.narrow(0, i, k).add_(part);
          }
        }
      }
      if (split_w)
        dWb32.narrow(0, 0, vb).addmm_(G32.t(), h32.narrow(0, r0, m));
      else if (need_w && r0 == 0)
        at::mm_out(dWb, G.t(), Hc);
      else if (need_w)
        dWb.addmm_(G.t(), Hc);  // fp32 weights only: C < n accumulates straight into dW
      if (need_b) db32.narrow(0, v0, vb).add_(G32.sum(0, false, at::kFloat));
    }
    if (split_w) dWb.copy_(dWb32.narrow(0, 0, vb));
  }
  if (!need_h) return finish(no_dH);
  at::Tensor dHk = dH32.to(hidden.scalar_type());
  if (!rows.idx.defined()) return finish(dHk);
  at::Tensor dH = at::zeros({N, D}, hidden.options());
  dH.index_copy_(0, rows.idx, dHk);
  return finish(dH);
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
  m.def(
      "linear_token_logprobs_backward(Tensor? grad_logp, Tensor? grad_lse, Tensor? grad_entropy, Tensor hidden,"
      " Tensor weight, Tensor targets, Tensor? bias, Tensor lse, Tensor entropy, float temperature,"
      " int ignore_index, int chunk_size, bool[3] output_mask) -> (Tensor grad_hidden, Tensor grad_weight,"
      " Tensor grad_bias)");
  m.def("default_chunk_size(int n, int v) -> int", &gvu::default_chunk_size);  // for tests and the benchmark
}

TORCH_LIBRARY_IMPL(gvu_kernels, CPU, m) {
  m.impl("linear_token_logprobs", &gvu::linear_token_logprobs_fwd);
  m.impl("linear_token_logprobs_frozen", &gvu::linear_token_logprobs_frozen_fwd);
  m.impl("linear_token_logprobs_backward", &gvu::linear_token_logprobs_bwd);
}
