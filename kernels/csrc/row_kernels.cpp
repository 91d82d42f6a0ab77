// SIMD bodies of the per-row log-prob maths, written as plain loops that GCC vectorises.
//
// Why plain loops + target_clones rather than at::vec::Vectorized: ATen's runtime dispatch (DispatchStub) is
// internal to libtorch; in an extension at::vec only gives the ISA the TU is compiled for, i.e. SSE2 without
// -march flags. Here each leaf is cloned for x86-64-v4 (AVX-512), v3 (AVX2+FMA) and baseline, and the ifunc
// resolver picks one from CPUID at load time. exp is our own Cephes-style polynomial (rel. error ~1e-7) so
// the loops vectorise without -ffast-math; the reductions use `omp simd reduction` for the same reason. On
// x86-64-v4 CPUs the two exp loops (a block's sums, a span's gradient) run AVX-512 intrinsic bodies instead, for
// two instructions GCC does not emit from plain loops (exp_sums_v4 / grad_v4 below).
#include "row_kernels.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#define GVU_AVX512_LOOPS 1  // the intrinsic exp loops below, compiled for x86-64-v4 and picked at run time
#define GVU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define GVU_CLONES
#endif
#define GVU_INLINE inline __attribute__((always_inline))

namespace gvu {
namespace {

// A block of logits small enough to stay in L1 (8 KiB of fp32) between its max pass and its exp pass, so a
// row is read from memory once.
constexpr int64_t kBlock = 2048;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// Below this exp() is 0 here: 2^-124 is the last power the scaling below forms exactly (a normal float), and -inf
// logits give p = 0, not NaN.
constexpr float kExpFloor = -86.0f;

GVU_INLINE float bits_to_float(uint32_t u) { return __builtin_bit_cast(float, u); }
GVU_INLINE uint32_t float_to_bits(float f) { return __builtin_bit_cast(uint32_t, f); }

// exp(x) for x <= 0 (callers subtract the row max) as 2^y, y = x log2(e) = k + r with k an integer, |r| <= 1/2:
// 2^r by a degree-6 polynomial (relative error 2e-9 in exact arithmetic, 1.0e-7 evaluated in fp32, as Cephes'
// expf), 2^k formed in the exponent bits. Adding 1.5 * 2^23 rounds y to k and leaves k in the low mantissa bits, so
// no float -> int conversion runs; r = x log2(e) - k is one FMA (GCC contracts it). 15 vector ops an element-group
// with the load and the sum, against 20 for the natural-base Cephes form (two-constant range reduction,
// conversion, rebias, shift, multiply) before: the loop is bound by its vector ops, not by memory.
GVU_INLINE float exp_neg(float x) {
  constexpr float kLog2e = 1.44269504088896341f, kMagic = 12582912.0f;
  const float t = x * kLog2e + kMagic;
  const float k = t - kMagic;
  const float r = x * kLog2e - k;
  float p = 1.5353300841525197e-4f;
  p = p * r + 1.3398848241195083e-3f;
  p = p * r + 9.6184369176626205e-3f;
  p = p * r + 5.5503323674201965e-2f;
  p = p * r + 2.4022647738456726e-1f;
  p = p * r + 6.9314718246459961e-1f;
  p = p * r + 1.0f;
  // k + 127 in the exponent field: the low bits of t hold 0x400000 + k (k >= -124 above the floor)
  const float scale = bits_to_float((float_to_bits(t) + 127u) << 23);
  return x < kExpFloor ? 0.0f : p * scale;  // NaN stays NaN (p is NaN)
}

#ifdef GVU_AVX512_LOOPS
// The fp32 exp loops again in AVX-512 intrinsics, for the one thing GCC does not emit from the plain loops:
// vscalefps forms p * 2^k in one op (was: add the bias, shift into the exponent, multiply) and its zero-masking
// gives exp = 0 below the floor for free (was: compare and blend). k from vrndscaleps. 13 vector ops per 16
// logits with the load and the sum, against 15 in exp_neg's loop. Same polynomial, same floor, NaN stays NaN
// (NaN fails the floor compare, so its lane is not zeroed and p is NaN). Called once per L1 block (or span), so
// the call costs nothing; chosen at run time when the CPU has x86-64-v4 (g_avx512_loops).
// GCC 12 warns that its own _mm512_undefined_ps inside the masked intrinsics is used uninitialised: it is not.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define GVU_V4 __attribute__((target("arch=x86-64-v4")))
#define GVU_V4_INLINE GVU_V4 inline __attribute__((always_inline))

// exp(d) for d <= 0, and which lanes are at or above the floor (the others are 0).
GVU_V4_INLINE __m512 exp_neg16(__m512 d, __mmask16* live) {
  *live = _mm512_cmp_ps_mask(d, _mm512_set1_ps(kExpFloor), _CMP_NLT_UQ);  // not (d < floor): NaN is live
  const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
  const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(d, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_fmsub_ps(d, log2e, k);
  __m512 p = _mm512_set1_ps(1.5353300841525197e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3398848241195083e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(9.6184369176626205e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.5503323674201965e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(2.4022647738456726e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(6.9314718246459961e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_maskz_scalef_ps(*live, p, k);
}

GVU_V4_INLINE __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1u);
}

// s += sum exp(x_i * inv_t - m), and t += sum exp(.) * (.) with the floor's value where exp is 0 (want_t).
GVU_V4 void exp_sums_v4(const float* x, int64_t n, float inv_t, float m, bool want_t, float* s_out, float* t_out) {
  const __m512 vt = _mm512_set1_ps(inv_t), vm = _mm512_set1_ps(m);
  __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps(), t0 = _mm512_setzero_ps(), t1 = _mm512_setzero_ps();
  int64_t i = 0;
  __mmask16 live;
  // Two accumulators: the adds of consecutive vectors do not wait on each other.
  for (; i + 32 <= n; i += 32) {
    const __m512 d0 = _mm512_fmsub_ps(_mm512_loadu_ps(x + i), vt, vm);
    const __m512 d1 = _mm512_fmsub_ps(_mm512_loadu_ps(x + i + 16), vt, vm);
    __mmask16 l1;
    const __m512 e0 = exp_neg16(d0, &live), e1 = exp_neg16(d1, &l1);
    s0 = _mm512_add_ps(s0, e0);
    s1 = _mm512_add_ps(s1, e1);
    if (want_t) {
      t0 = _mm512_mask3_fmadd_ps(e0, d0, t0, live);
      t1 = _mm512_mask3_fmadd_ps(e1, d1, t1, l1);
    }
  }
  for (; i < n; i += 16) {
    const __mmask16 in = tail_mask(n - i);
    const __m512 d = _mm512_fmsub_ps(_mm512_maskz_loadu_ps(in, x + i), vt, vm);
    const __m512 e = exp_neg16(d, &live);
    s0 = _mm512_mask_add_ps(s0, in, s0, e);
    if (want_t) t0 = _mm512_mask3_fmadd_ps(e, d, t0, static_cast<__mmask16>(live & in));
  }
  *s_out += _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
  if (want_t) *t_out += _mm512_reduce_add_ps(_mm512_add_ps(t0, t1));
}

// g_i = inv_t * p_i * (c0 - c1 * (log p_i + h)), as grad_span; g may alias x.
GVU_V4 void grad_v4(const float* x, float* g, int64_t n, float inv_t, float m, float log_s, float c0, float c1,
                    float h) {
  const __m512 vt = _mm512_set1_ps(inv_t), vm = _mm512_set1_ps(m), vl = _mm512_set1_ps(log_s);
  const __m512 vc0 = _mm512_set1_ps(c0), vc1 = _mm512_set1_ps(c1), vh = _mm512_set1_ps(h);
  const __m512 floor = _mm512_set1_ps(kExpFloor);
  auto one = [&](__m512 xv) GVU_V4 {
    __mmask16 live;
    const __m512 d = _mm512_sub_ps(_mm512_fmsub_ps(xv, vt, vm), vl);
    const __m512 p = exp_neg16(d, &live);
    const __m512 logp = _mm512_max_ps(floor, d);  // the second operand on NaN: NaN stays NaN
    const __m512 c = _mm512_fnmadd_ps(vc1, _mm512_add_ps(logp, vh), vc0);
    return _mm512_mul_ps(_mm512_mul_ps(vt, p), c);
  };
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(g + i, one(_mm512_loadu_ps(x + i)));
  if (i < n) {
    const __mmask16 in = tail_mask(n - i);
    _mm512_mask_storeu_ps(g + i, in, one(_mm512_maskz_loadu_ps(in, x + i)));
  }
}

bool cpu_has_v4() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("x86-64-v4") != 0;
}
// Read by the loops once per block; set at load (GVU_KERNELS_NO_V4_LOOPS=1: off) and by set_avx512_loops, which
// tests and A/B benchmarks call between ops (not while one runs).
std::atomic<bool> g_avx512_loops{[] {
  const char* off = std::getenv("GVU_KERNELS_NO_V4_LOOPS");
  return cpu_has_v4() && !(off && off[0] == '1');
}()};
#pragma GCC diagnostic pop
#endif

struct LoadF32 {
  const float* p;
  GVU_INLINE float operator()(int64_t i) const { return p[i]; }
};
struct LoadBF16 {
  const uint16_t* p;
  GVU_INLINE float operator()(int64_t i) const { return bits_to_float(static_cast<uint32_t>(p[i]) << 16); }
};
// fp16 <-> fp32 by bit manipulation: GCC 12 does not vectorise _Float16 conversions without AVX512-FP16.
struct LoadF16 {
  const uint16_t* p;
  GVU_INLINE float operator()(int64_t i) const {
    const uint32_t h = p[i];
    const uint32_t em = h & 0x7FFFu;
    // Shifting exponent+mantissa into place and multiplying by 2^112 rebiases normals and subnormals alike.
    const float mag = bits_to_float(em << 13) * 0x1p112f;
    const uint32_t u = em >= 0x7C00u ? ((em << 13) | 0x7F800000u) : float_to_bits(mag);  // inf / NaN
    return bits_to_float(u | ((h & 0x8000u) << 16));
  }
};
struct StoreF32 {
  float* p;
  GVU_INLINE void operator()(int64_t i, float v) const { p[i] = v; }
};
struct StoreBF16 {
  uint16_t* p;
  // Round to nearest even, as c10::BFloat16 does; NaN stays a quiet NaN.
  GVU_INLINE void operator()(int64_t i, float v) const {
    uint32_t u = float_to_bits(v);
    uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    p[i] = static_cast<uint16_t>(v != v ? 0x7FC0u : r);
  }
};
struct StoreF16 {
  uint16_t* p;
  // Round to nearest even. Subnormal halves come from adding a magic float whose ulp is the half ulp.
  GVU_INLINE void operator()(int64_t i, float v) const {
    const uint32_t u = float_to_bits(v);
    const uint32_t sign = (u >> 16) & 0x8000u;
    const uint32_t a = u & 0x7FFFFFFFu;
    const uint32_t big = a > 0x7F800000u ? 0x7E00u : 0x7C00u;  // NaN : overflow to inf
    const uint32_t magic = 126u << 23;  // 0.5f: its ulp equals the smallest half subnormal
    const uint32_t sub = float_to_bits(bits_to_float(a) + bits_to_float(magic)) - magic;
    const uint32_t odd = (a >> 13) & 1u;
    const uint32_t norm = (a + 0xC8000FFFu + odd) >> 13;  // rebias (15 - 127) << 23, round half to even
    const uint32_t r = a >= (143u << 23) ? big : (a < (113u << 23) ? sub : norm);
    p[i] = static_cast<uint16_t>(r | sign);
  }
};

// bf16 / fp16 rows go through an fp32 block in L1 first: GCC vectorises a loop that widens 16-bit loads at 256
// bits even for AVX-512 (half the lanes of the fp32 loop), and the exp loop is bound by its vector ops; staged,
// every exp loop runs on fp32 at the full width (`objdump -d kernels/_C*.so`: zmm in the AVX-512 clone's loops).
template <typename Ld>
constexpr bool kF32 = std::is_same_v<Ld, LoadF32>;

template <typename Ld, bool WantT>
GVU_INLINE SpanStats stats_body(Ld ld, int64_t n, float inv_t) {
  SpanStats st{kNegInf, 0.0, 0.0};
  alignas(64) float buf[kF32<Ld> ? 1 : kBlock];
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t len = std::min(kBlock, n - b);
    const float* x;
    float bm = kNegInf;
    if constexpr (kF32<Ld>) {
      x = ld.p + b;
#pragma omp simd reduction(max : bm)
      for (int64_t i = 0; i < len; ++i) bm = x[i] > bm ? x[i] : bm;
    } else {
#pragma omp simd reduction(max : bm)
      for (int64_t i = 0; i < len; ++i) {
        const float v = ld(b + i);
        buf[i] = v;
        bm = v > bm ? v : bm;
      }
      x = buf;
    }
    bm *= inv_t;  // inv_t > 0, so max(x) * inv_t == max(x * inv_t) exactly.
    if (bm == kNegInf) continue;  // a block of -inf adds nothing
    if (bm > st.m) {
      if (st.s > 0.0) {
        const double delta = static_cast<double>(st.m) - bm;
        const double f = std::exp(delta);
        st.t = f * (st.t + delta * st.s);
        st.s *= f;
      }
      st.m = bm;
    }
    const float m = st.m;
    float s = 0.0f, t = 0.0f;
#ifdef GVU_AVX512_LOOPS
    if (g_avx512_loops.load(std::memory_order_relaxed)) {
      exp_sums_v4(x, len, inv_t, m, WantT, &s, &t);
    } else
#endif
    if (WantT) {
#pragma omp simd reduction(+ : s, t)
      for (int64_t i = 0; i < len; ++i) {
        const float d = x[i] * inv_t - m;
        const float e = exp_neg(d);
        s += e;
        t += e * (d < kExpFloor ? kExpFloor : d);  // e == 0 there; avoids 0 * -inf
      }
    } else {
#pragma omp simd reduction(+ : s)
      for (int64_t i = 0; i < len; ++i) s += exp_neg(x[i] * inv_t - m);
    }
    st.s += s;
    st.t += t;
  }
  return st;
}

GVU_INLINE void grad_span(const float* x, float* g, int64_t n, float inv_t, float m, float log_s, float c0, float c1,
                          float h) {
#ifdef GVU_AVX512_LOOPS
  if (g_avx512_loops.load(std::memory_order_relaxed)) return grad_v4(x, g, n, inv_t, m, log_s, c0, c1, h);
#endif
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    // (z - m) first: exact near the max, where z - lse would lose |lse| * 2^-24 (1e-3 in p at |z| ~ 2e4).
    const float d = (x[i] * inv_t - m) - log_s;
    const float p = exp_neg(d);
    const float logp = d < kExpFloor ? kExpFloor : d;  // p == 0 there; avoids 0 * -inf
    g[i] = inv_t * p * (c0 - c1 * (logp + h));
  }
}

// fp32 -> fp32 in one loop (in place allowed); 16-bit inputs staged block by block into fp32 (see stats_body), the
// gradient formed there and stored (an fp32 output directly), so a block is read before it is overwritten.
template <typename Ld, typename St>
GVU_INLINE void grad_body(Ld ld, St st, int64_t n, float inv_t, float m, float log_s, float c0, float c1,
                          float h) {
  if constexpr (kF32<Ld>) {
    grad_span(ld.p, st.p, n, inv_t, m, log_s, c0, c1, h);
  } else {
    alignas(64) float buf[kBlock];
    for (int64_t b = 0; b < n; b += kBlock) {
      const int64_t len = std::min(kBlock, n - b);
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) buf[i] = ld(b + i);
      if constexpr (std::is_same_v<St, StoreF32>) {
        grad_span(buf, st.p + b, len, inv_t, m, log_s, c0, c1, h);
      } else {
        grad_span(buf, buf, len, inv_t, m, log_s, c0, c1, h);
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) st(b + i, buf[i]);
      }
    }
  }
}

#define GVU_STATS_LEAF(NAME, LOAD, CTYPE, WANT)                                      \
  GVU_CLONES SpanStats NAME(const void* x, int64_t n, float inv_t) {                  \
    return stats_body<LOAD, WANT>(LOAD{static_cast<const CTYPE*>(x)}, n, inv_t); \
  }
GVU_STATS_LEAF(stats_f32_t, LoadF32, float, true)
GVU_STATS_LEAF(stats_f32_n, LoadF32, float, false)
GVU_STATS_LEAF(stats_bf16_t, LoadBF16, uint16_t, true)
GVU_STATS_LEAF(stats_bf16_n, LoadBF16, uint16_t, false)
GVU_STATS_LEAF(stats_f16_t, LoadF16, uint16_t, true)
GVU_STATS_LEAF(stats_f16_n, LoadF16, uint16_t, false)

#define GVU_GRAD_LEAF(NAME, LOAD, ICTYPE, STORE, OCTYPE)                                                  \
  GVU_CLONES void NAME(const void* x, void* out, int64_t n, float inv_t, float m, float log_s, float c0,   \
                       float c1, float h) {                                                               \
    grad_body(LOAD{static_cast<const ICTYPE*>(x)}, STORE{static_cast<OCTYPE*>(out)}, n, inv_t, m, log_s, \
              c0, c1, h);                                                                                 \
  }
GVU_GRAD_LEAF(grad_f32_f32, LoadF32, float, StoreF32, float)
GVU_GRAD_LEAF(grad_bf16_bf16, LoadBF16, uint16_t, StoreBF16, uint16_t)
GVU_GRAD_LEAF(grad_f16_f16, LoadF16, uint16_t, StoreF16, uint16_t)
GVU_GRAD_LEAF(grad_bf16_f32, LoadBF16, uint16_t, StoreF32, float)
GVU_GRAD_LEAF(grad_f16_f32, LoadF16, uint16_t, StoreF32, float)

// The same gradient along a row of transposed logits (one vocabulary entry, one column per token): every
// per-token number is an array indexed like x. k = (m, log_s, c0, c1, h), each n long.
template <typename Ld, typename St>
GVU_INLINE void col_grad_body(Ld ld, St st, int64_t n, float inv_t, const float* const* k) {
  const float *m = k[0], *log_s = k[1], *c0 = k[2], *c1 = k[3], *h = k[4];
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float d = (ld(i) * inv_t - m[i]) - log_s[i];
    const float p = exp_neg(d);
    const float logp = d < kExpFloor ? kExpFloor : d;
    st(i, inv_t * p * (c0[i] - c1[i] * (logp + h[i])));
  }
}

#define GVU_COL_LEAF(NAME, LOAD, ICTYPE, STORE, OCTYPE)                                                   \
  GVU_CLONES void NAME(const void* x, void* out, int64_t n, float inv_t, const float* const* k) {       \
    col_grad_body(LOAD{static_cast<const ICTYPE*>(x)}, STORE{static_cast<OCTYPE*>(out)}, n, inv_t, k); \
  }
GVU_COL_LEAF(col_f32_f32, LoadF32, float, StoreF32, float)
GVU_COL_LEAF(col_bf16_bf16, LoadBF16, uint16_t, StoreBF16, uint16_t)
GVU_COL_LEAF(col_f16_f16, LoadF16, uint16_t, StoreF16, uint16_t)
GVU_COL_LEAF(col_bf16_f32, LoadBF16, uint16_t, StoreF32, float)
GVU_COL_LEAF(col_f16_f32, LoadF16, uint16_t, StoreF32, float)

}  // namespace

void col_grad(const void* x, DType dt, void* out, DType out_dt, int64_t n, float inv_t, const float* const* k) {
  if (dt == DType::F32) return col_f32_f32(x, out, n, inv_t, k);
  if (dt == DType::BF16)
    return out_dt == DType::F32 ? col_bf16_f32(x, out, n, inv_t, k) : col_bf16_bf16(x, out, n, inv_t, k);
  return out_dt == DType::F32 ? col_f16_f32(x, out, n, inv_t, k) : col_f16_f16(x, out, n, inv_t, k);
}

SpanStats span_stats(const void* x, DType dt, int64_t n, float inv_t, bool want_t) {
  switch (dt) {
    case DType::F32:
      return want_t ? stats_f32_t(x, n, inv_t) : stats_f32_n(x, n, inv_t);
    case DType::BF16:
      return want_t ? stats_bf16_t(x, n, inv_t) : stats_bf16_n(x, n, inv_t);
    case DType::F16:
    default:
      return want_t ? stats_f16_t(x, n, inv_t) : stats_f16_n(x, n, inv_t);
  }
}

void merge_stats(SpanStats& a, const SpanStats& b) {
  if (!(b.s > 0.0)) {
    if (b.s != b.s) a.s = b.s;  // NaN propagates
    return;
  }
  if (!(a.s > 0.0)) {
    if (a.s != a.s) return;
    a = b;
    return;
  }
  const float m = std::max(a.m, b.m);
  const double da = static_cast<double>(a.m) - m, db = static_cast<double>(b.m) - m;
  const double fa = std::exp(da), fb = std::exp(db);
  a.t = fa * (a.t + da * a.s) + fb * (b.t + db * b.s);
  a.s = fa * a.s + fb * b.s;
  a.m = m;
}

void span_grad(const void* x, DType dt, void* out, DType out_dt, int64_t n, float inv_t, float m, float log_s,
               float c0, float c1, float h) {
  if (dt == DType::F32) return grad_f32_f32(x, out, n, inv_t, m, log_s, c0, c1, h);
  if (dt == DType::BF16) {
    if (out_dt == DType::F32) return grad_bf16_f32(x, out, n, inv_t, m, log_s, c0, c1, h);
    return grad_bf16_bf16(x, out, n, inv_t, m, log_s, c0, c1, h);
  }
  if (out_dt == DType::F32) return grad_f16_f32(x, out, n, inv_t, m, log_s, c0, c1, h);
  return grad_f16_f16(x, out, n, inv_t, m, log_s, c0, c1, h);
}

bool avx512_loops() {
#ifdef GVU_AVX512_LOOPS
  return g_avx512_loops.load();
#else
  return false;
#endif
}

bool set_avx512_loops(bool on) {
  const bool was = avx512_loops();
#ifdef GVU_AVX512_LOOPS
  g_avx512_loops.store(on && cpu_has_v4());
#endif
  return was;
}

const char* simd_level() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return avx512_loops() ? "avx512" : "avx512-plain";
  if (__builtin_cpu_supports("x86-64-v3")) return "avx2";
#endif
  return "baseline";
}

}  // namespace gvu
