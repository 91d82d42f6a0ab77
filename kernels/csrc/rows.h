// Row-parallel drivers over a matrix of logits, shared by token_logprobs and linear_token_logprobs.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "row_kernels.h"

namespace gvu {

DType dtype_of(const at::Tensor& t);  // fp32 / bf16 / fp16, else an error naming the dtype

// Forward over N rows of V logits (row r starts at x + r * row_stride elements, unit column stride):
// logp[r] = (z_t - m) - log s, lse[r] = m + log s = logsumexp(z), ent[r] = entropy (if ent != nullptr),
// stats[2r], stats[2r+1] = (m, log s) with m the row max (if stats != nullptr: what the backward needs), z = x * inv_t.
// Rows whose target equals ignore_index get 0 everywhere. Threads split rows, or (row, V-span) pairs
// when N is small, so one long row still uses every core.
void rows_forward(const void* x, DType dt, int64_t row_stride, int64_t N, int64_t V, const int64_t* tgt,
                  int64_t ignore_index, float inv_t, float* logp, float* lse, float* ent, float* stats = nullptr);

// Backward: out[r, :] = inv_t * (g_logp (onehot - p) + g_lse p - g_ent p (log p + H)), zero on ignored rows, with
// log p = (z - m) - log s from the forward's stats (N x 2), so logits near 1e4 keep p exact.
// g_* may be nullptr (no gradient from that output). out may alias x when out_dt == dt (in place).
void rows_backward(const void* x, DType dt, int64_t row_stride, void* out, DType out_dt, int64_t out_stride,
                   int64_t N, int64_t V, const int64_t* tgt, int64_t ignore_index, float inv_t, const float* g_logp,
                   const float* g_lse, const float* g_ent, const float* stats, const float* ent);

// rows_backward on a transposed tile, in place: x is (V, N) contiguous, column r holds token r's logits over
// this vocabulary block and tgt[r] its target relative to the block (outside [0, V): no one-hot here). Every
// column is a kept token (no ignore_index). The backward of a trainable head's weight uses it so that
// dW_block = G^T H is a GEMM of two row-major operands (a transposed operand ran at half the rate in oneDNN).
void cols_backward(void* x, DType dt, int64_t V, int64_t N, const int64_t* tgt, float inv_t, const float* g_logp,
                   const float* g_lse, const float* g_ent, const float* stats, const float* ent);

// The CPU has native bf16 products (avx512_bf16 or amx_bf16 in CPUID), which torch's bf16 GEMMs use (oneDNN AMX /
// AVX512-BF16 kernels); without them those GEMMs crawl, and linear_token_logprobs forms its bf16 / fp16 products
// in fp32 tiles instead (fp32_tiles(): !native_bf16(), or GVU_KERNELS_FP32_TILES=1 / 0 to force it either way).
bool native_bf16();
bool fp32_tiles();

// Ask for transparent huge pages on a fresh, untouched buffer of >= 8 MB (no-op otherwise or if unsupported).
void advise_huge_pages(void* p, size_t bytes);
bool huge_pages_enabled();  // GVU_KERNELS_THP=1 in the environment (read once)

// An (N, V) contiguous tensor in `opts` for an N x V buffer made anew each step (a token backward's gradient, a
// trainable head's saved logits: one `slot` each). From one buffer per slot kept between calls when nothing else
// holds its storage any more (autograd has consumed and freed the last one) and it is large enough, so a training
// loop writes each step's buffer into pages already mapped instead of faulting in N x V fresh ones
// (what a fresh tensor costs on CPU, where torch does not cache memory: 2048 x 32000 fwd+bwd, one thread, 164.8 ->
// 81.0 ms fp32, 116.9 -> 76.7 ms bf16, GVU_KERNELS_REUSE_MB=0 vs default, bench/README.md). Kept only up to
// cache_bytes (<= 0 frees it and always allocates); *fresh says which happened.
enum class Reuse : int { TokenGrad = 0, SavedLogits = 1 };
std::vector<int64_t> reuse_counts();  // buffers reused so far, per slot (for tests)
at::Tensor reusable_rows(Reuse slot, int64_t N, int64_t V, const at::TensorOptions& opts, int64_t cache_bytes,
                         bool* fresh);

// Throws (from the calling thread) if a non-ignored target lies outside [0, V).
void check_targets(const int64_t* tgt, int64_t N, int64_t V, int64_t ignore_index);

}  // namespace gvu
