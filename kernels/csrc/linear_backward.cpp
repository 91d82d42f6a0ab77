// linear_token_logprobs backward over V-blocks of logits, recomputed or saved by the forward (see
// linear_token_logprobs.cpp).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <limits>
#include <tuple>

#include "linear_common.h"

namespace gvu {
namespace {

// dW (and db) alone, the backward of a trainable head whose hidden's gradient came from the forward's sums
// (cen, ent_dir): tiles are transposed, Lt = Wb H^T (vb vocabulary rows x m tokens), its grad-logits Gt written
// over it in place (cols_backward), then dW_block = Gt H. Both GEMMs take row-major operands, which oneDNN's
// bf16 AMX kernels ran at ~2x the rate of the transposed G^T operand the dH-and-dW loop below needs (2048 x 8192
// tiles, D = 1024, on this 2-core Sapphire Rapids). dW is rounded once: with all rows in one chunk straight
// from the GEMM; with several chunks (bf16/fp16 past the 64 MiB budget) in an fp32 block accumulator.
void weight_grads_t(const at::Tensor& weight, const at::Tensor& hw, const at::Tensor& t, const at::Tensor& bias,
                    const at::Tensor& gl, const at::Tensor& gs, const at::Tensor& ge, const at::Tensor& stats,
                    const at::Tensor& ent, float inv_t, int64_t chunk_size, at::Tensor* dW, at::Tensor* db32) {
  const int64_t n = hw.size(0), D = hw.size(1), V = weight.size(0);
  const int64_t es = weight.element_size();
  const bool w32 = weight.scalar_type() == at::kFloat;
  const int64_t Vb = std::min<int64_t>(V, std::clamp<int64_t>(kChunkBytes / (n * es) / 256 * 256, 1024, 8192));
  const int64_t C = chunk_size > 0 ? std::min(chunk_size, n)
                                   : std::min<int64_t>(n, std::max<int64_t>(16, kChunkBytes / (Vb * es)));
  const bool split = dW && !w32 && C < n;
  const bool tiles = fp32_tiles() && !w32;  // products in fp32: the logits tile is fp32 from its GEMM on
  const bool f32 = split || tiles;
  const DType gdt = f32 ? DType::F32 : dtype_of(weight);
  at::Tensor buf = at::empty({Vb * C}, weight.options().dtype(f32 ? at::kFloat : weight.scalar_type()));
  at::Tensor lt16 = split && !tiles ? at::empty({Vb * C}, weight.options()) : at::Tensor();
  at::Tensor h32 = split ? hw.to(at::kFloat) : at::Tensor();
  at::Tensor dWb32 = split ? at::empty({Vb, D}, hw.options().dtype(at::kFloat)) : at::Tensor();
  at::Tensor tshift = at::empty_like(t);
  auto ptr = [](const at::Tensor& x, int64_t off) { return x.defined() ? x.data_ptr<float>() + off : nullptr; };
  for (int64_t v0 = 0; v0 < V; v0 += Vb) {
    const int64_t vb = std::min(Vb, V - v0);
    const at::Tensor Wb = weight.narrow(0, v0, vb);
    const at::Tensor bb = bias.defined() ? bias.narrow(0, v0, vb).unsqueeze(1) : at::Tensor();
    at::Tensor dWb = dW ? dW->narrow(0, v0, vb) : at::Tensor();
    if (split) dWb32.narrow(0, 0, vb).zero_();
    at::sub_out(tshift, t, v0);
    for (int64_t r0 = 0; r0 < n; r0 += C) {
      const int64_t m = std::min(C, n - r0);
      const at::Tensor Hc = hw.narrow(0, r0, m);
      // Lt in weight's dtype (the GEMM's), then grad-logits over it: in place, or into an fp32 tile when split.
      at::Tensor Lt = (lt16.defined() ? lt16 : buf).narrow(0, 0, vb * m).view({vb, m});
      gemm_out(Lt, Wb, Hc.t(), bb);
      at::Tensor Gt = buf.narrow(0, 0, vb * m).view({vb, m});
      if (lt16.defined()) Gt.copy_(Lt);
      cols_backward(Gt.data_ptr(), gdt, vb, m, tshift.data_ptr<int64_t>() + r0, inv_t, ptr(gl, r0), ptr(gs, r0),
                    ptr(ge, r0), stats.data_ptr<float>() + 2 * r0, ptr(ent, r0));
      if (split)
        dWb32.narrow(0, 0, vb).addmm_(Gt, h32.narrow(0, r0, m));
      else if (dW && r0 == 0)
        gemm_out(dWb, Gt, Hc, at::Tensor());
      else if (dW)
        dWb.addmm_(Gt, Hc);  // fp32 weights: C < n accumulates straight into dW
      if (db32) db32->narrow(0, v0, vb).add_(Gt.sum(1, false, at::kFloat));
    }
    if (split) dWb.copy_(dWb32.narrow(0, 0, vb));
  }
}

// dst (C, R) = src (R, C)^T for 2-byte elements (bf16 / fp16), rows of both contiguous, in 64 x 64 blocks so the
// strided side stays in cache: torch's transposing copy_ ran at ~1 GB/s on bf16 here.
void transpose16(const at::Tensor& src, at::Tensor& dst) {
  const int64_t R = src.size(0), C = src.size(1), ss = src.stride(0), ds = dst.stride(0);
  TORCH_CHECK(src.element_size() == 2 && dst.element_size() == 2 && src.stride(1) == 1 && dst.stride(1) == 1 &&
              dst.size(0) == C && dst.size(1) == R);
  const auto* s = static_cast<const uint16_t*>(src.data_ptr());
  auto* d = static_cast<uint16_t*>(dst.data_ptr());
  constexpr int64_t B = 64;
  at::parallel_for(0, (C + B - 1) / B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t j0 = b0 * B; j0 < std::min(C, b1 * B); j0 += B)
      for (int64_t i0 = 0; i0 < R; i0 += B)
        for (int64_t j = j0; j < std::min(C, j0 + B); ++j)
          for (int64_t i = i0; i < std::min(R, i0 + B); ++i) d[j * ds + i] = s[i * ss + j];
  });
}

// acc (fp32) += a @ b. fp32 operands accumulate in place; otherwise through `part` (a's dtype: bf16 from a bf16
// GEMM, rounded per V-block as eager's dH is; fp32 from gemm_out's fp32 tiles), kDhRows rows at a time (a C x D
// partial was 32 MB, a tenth of the whole backward's extra memory, at N=8192, D=2048).
constexpr int64_t kDhRows = 1024;
void add_mm(at::Tensor acc, const at::Tensor& a, const at::Tensor& b, at::Tensor& part) {
  if (a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat) {
    acc.addmm_(a, b);
    return;
  }
  for (int64_t i = 0; i < a.size(0); i += kDhRows) {
    const int64_t k = std::min(kDhRows, a.size(0) - i);
    at::Tensor p = part.narrow(0, 0, k);
    gemm_out(p, a.narrow(0, i, k), b, at::Tensor());
    acc.narrow(0, i, k).add_(p);
  }
}

// The backward of both forwards. `saved` (n_kept, V)-or-more logits from linear_token_logprobs_saved, or
// undefined: recompute them a tile at a time.
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_impl(
    const c10::optional<at::Tensor>& grad_logp, const c10::optional<at::Tensor>& grad_lse,
    const c10::optional<at::Tensor>& grad_entropy, const at::Tensor& saved, const at::Tensor& hidden,
    const at::Tensor& weight, const at::Tensor& targets_in, const c10::optional<at::Tensor>& bias_opt,
    const at::Tensor& lse_in, const at::Tensor& entropy_in, double temperature, int64_t ignore_index,
    int64_t chunk_size, std::array<bool, 3> output_mask) {
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
  if (saved.defined())
    TORCH_CHECK(saved.dim() == 2 && saved.size(0) >= rows.n && saved.size(1) == V && saved.stride(1) == 1,
                "gvu_kernels: saved logits must be (>= ", rows.n, ", ", V, ") with unit column stride, got ",
                saved.sizes());

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
  const float inv_t = static_cast<float>(1.0 / temperature);
  if (!need_h && !saved.defined()) {
    weight_grads_t(weight, hw, t, bias, gl, gs, ge, stats, ent, inv_t, chunk_size, need_w ? &dW : nullptr,
                   need_b ? &db32 : nullptr);
    return finish(no_dH);
  }

  // Tiles of (C rows) x (Vb vocab columns), V-blocks outermost, all kept rows in one chunk unless they exceed the
  // 64 MiB budget at Vb = 1024 (C < n only past ~32k bf16 rows, or when chunk_size asks). Per tile:
  // L = H Wb^T recomputed (or the saved logits' tile), G = grad-logits (in place over L, or from the saved tile
  // into the buffer, which leaves the saved logits intact for a second backward), then
  //   dH32 += G Wb           fp32 accumulation across V-blocks (N x D, small);
  //   dW[block] = G^T H      one GEMM with K = all rows: fp32 accumulation inside BLAS, rounded once to the
  //                          weight's dtype like eager's; no V x D fp32 buffer (a full fp32 dW is 2x the weight,
  //                          1.2 GB at 151936 x 2048). bf16 / fp16 in one chunk form it as (H^T G)^T (dw_t
  //                          below); the dW-only recompute (a frozen hidden) takes weight_grads_t instead, whose
  //                          transposed tiles need neither a G^T operand nor a transpose.
  // G is in weight's dtype (as eager autograd's grad-logits are), fp32 in fp32 tiles or when the saved logits are.
  // The forward's lse and entropy make every tile's grad-logits computable on its own.
  const at::ScalarType gdt = saved.defined() ? saved.scalar_type()
                             : (fp32_tiles() && !w32) ? at::kFloat
                                                     : weight.scalar_type();
  const int64_t es = static_cast<int64_t>(c10::elementSize(gdt));
  const int64_t n = rows.n;
  const int64_t Vb = std::min<int64_t>(V, std::clamp<int64_t>(kChunkBytes / (n * es) / 256 * 256, 1024, 8192));
  const int64_t C = chunk_size > 0 ? std::min(chunk_size, n)
                                   : std::min<int64_t>(n, std::max<int64_t>(16, kChunkBytes / (Vb * es)));
  // bf16/fp16 weights with rows over several chunks: each chunk's grad-logits are (or are copied to) fp32 and dW
  // sums the chunks in an fp32 (Vb, D) accumulator (fp32 GEMM, slower), so dW is still rounded once, not per chunk.
  const bool split_w = need_w && !w32 && C < n;
  const bool g_is_32 = gdt == at::kFloat;
  at::Tensor dH32 = need_h ? at::zeros({n, D}, f32) : at::Tensor();
  at::Tensor buf = at::empty({C, Vb}, weight.options().dtype(gdt));
  at::Tensor dHpart = (need_h && !(w32 && g_is_32)) ? at::empty({std::min(C, kDhRows), D}, weight.options().dtype(gdt))
                                                    : at::Tensor();
  at::Tensor g32 = split_w && !g_is_32 ? at::empty({C, Vb}, f32) : at::Tensor();
  at::Tensor h32 = split_w ? hw.to(at::kFloat) : at::Tensor();
  at::Tensor dWb32 = split_w ? at::empty({Vb, D}, f32) : at::Tensor();
  // bf16 / fp16 dW in one chunk: dW_b^T = H^T G (D x vb), two row-major operands (H^T transposed once), then
  // transposed into dW's rows (transpose16), instead of G^T H with its transposed operand: on this Sapphire Rapids
  // (1 thread, 2048 x 8192 x 1024 tiles) 60 ms + the transpose against 121 ms. fp32 GEMMs ran at the same rate
  // either way, so fp32 keeps G^T H.
  const bool dw_t = need_w && !split_w && gdt != at::kFloat;
  const at::Tensor Ht = dw_t ? hw.t().contiguous() : at::Tensor();
  at::Tensor dWt = dw_t ? at::empty({D, Vb}, weight.options()) : at::Tensor();
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
      at::Tensor G = buf.narrow(0, 0, m).narrow(1, 0, vb);
      const at::Tensor Hc = hw.narrow(0, r0, m);
      at::Tensor L = saved.defined() ? saved.narrow(0, r0, m).narrow(1, v0, vb) : G;
      if (!saved.defined()) chunk_logits(G, Hc, Wb, bb);
      at::Tensor G32 = g32.defined() ? g32.narrow(0, 0, m).narrow(1, 0, vb) : G;
      rows_backward(L.data_ptr(), dtype_of(L), L.stride(0), G32.data_ptr(), dtype_of(G32), G32.stride(0), m, vb,
                    tshift.data_ptr<int64_t>() + r0, kNoIgnore, inv_t, ptr(gl, r0), ptr(gs, r0), ptr(ge, r0),
                    stats.data_ptr<float>() + 2 * r0, ptr(ent, r0));
      if (g32.defined() && need_h) G.copy_(G32);
      if (need_h) add_mm(dH32.narrow(0, r0, m), G, Wb, dHpart);
      if (split_w) {
        dWb32.narrow(0, 0, vb).addmm_(G32.t(), h32.narrow(0, r0, m));
      } else if (dw_t) {  // r0 == 0: one chunk
        at::Tensor T = dWt.narrow(1, 0, vb);
        at::mm_out(T, Ht, G);
        transpose16(T, dWb);
      } else if (need_w && r0 == 0) {
        gemm_out(dWb, G.t(), Hc, at::Tensor());
      } else if (need_w) {
        dWb.addmm_(G.t(), Hc);  // fp32 weights only: C < n accumulates straight into dW
      }
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

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_token_logprobs_bwd(
    const c10::optional<at::Tensor>& grad_logp, const c10::optional<at::Tensor>& grad_lse,
    const c10::optional<at::Tensor>& grad_entropy, const at::Tensor& hidden, const at::Tensor& weight,
    const at::Tensor& targets, const c10::optional<at::Tensor>& bias, const at::Tensor& lse,
    const at::Tensor& entropy, double temperature, int64_t ignore_index, int64_t chunk_size,
    std::array<bool, 3> output_mask) {
  return backward_impl(grad_logp, grad_lse, grad_entropy, at::Tensor(), hidden, weight, targets, bias, lse, entropy,
                       temperature, ignore_index, chunk_size, output_mask);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_token_logprobs_saved_bwd(
    const c10::optional<at::Tensor>& grad_logp, const c10::optional<at::Tensor>& grad_lse,
    const c10::optional<at::Tensor>& grad_entropy, const at::Tensor& logits, const at::Tensor& hidden,
    const at::Tensor& weight, const at::Tensor& targets, const c10::optional<at::Tensor>& bias,
    const at::Tensor& lse, const at::Tensor& entropy, double temperature, int64_t ignore_index, int64_t chunk_size,
    std::array<bool, 3> output_mask) {
  return backward_impl(grad_logp, grad_lse, grad_entropy, logits, hidden, weight, targets, bias, lse, entropy,
                       temperature, ignore_index, chunk_size, output_mask);
}

}  // namespace gvu
