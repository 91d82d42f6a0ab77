// Per-row SIMD building blocks shared by the token and linear log-prob ops.
//
// Every function works on one contiguous span of a row of logits x (fp32, bf16 or fp16 stored as uint16) and
// accumulates in fp32. They are compiled once per ISA level (AVX-512, AVX2+FMA, baseline x86-64) with GCC
// target_clones and picked at load time from CPUID, so the shipped library never needs -march=native.
#pragma once

#include <cstdint>

namespace gvu {

enum class DType : int { F32 = 0, BF16 = 1, F16 = 2 };

// Stats of exp(z - m) over a span with z = x * inv_t: s = sum exp(z - m), t = sum exp(z - m) * (z - m).
// With the row's final (m, s, t): lse = m + log s and entropy = log s - t / s.
struct SpanStats {
  float m;  // running max of z (-inf for an empty span or one of -inf)
  double s;
  double t;
};

// One pass over x[0, n): online max/sum-exp in L1-sized blocks (max of a block, then its exp sums).
SpanStats span_stats(const void* x, DType dt, int64_t n, float inv_t, bool want_t);

// Merge b into a (associative; either may be empty).
void merge_stats(SpanStats& a, const SpanStats& b);

// grad[i] = inv_t * p_i * (c0 - c1 * (log p_i + h)) with log p_i = (x_i * inv_t - m) - log_s (the row's max m and
// log s, lse = m + log s); the caller adds the one-hot term at the target. out may alias x (in place) only when
// out_dt == dt.
void span_grad(const void* x, DType dt, void* out, DType out_dt, int64_t n, float inv_t, float m, float log_s,
               float c0, float c1, float h);

// span_grad along a row of transposed logits (a vocabulary entry, one column per token): grad[i] as above with
// the token's numbers k = {m, log_s, c0, c1, h}, five arrays of n floats. No one-hot term.
void col_grad(const void* x, DType dt, void* out, DType out_dt, int64_t n, float inv_t, const float* const* k);

// Whether the exp loops run the AVX-512 intrinsic bodies (x86-64-v4 CPUs; GVU_KERNELS_NO_V4_LOOPS=1 turns them off
// at load). set_avx512_loops switches them between ops (on only where the CPU has them) and returns the old value.
bool avx512_loops();
bool set_avx512_loops(bool on);

// Which clone the loader picked, for the benchmark's machine info ("avx512", "avx2" or "baseline"; "avx512-plain"
// while the intrinsic loops are off).
const char* simd_level();

}  // namespace gvu
