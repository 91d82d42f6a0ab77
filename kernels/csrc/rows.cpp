// Row-parallel drivers: OpenMP over rows, or over (row, span of V) when there are fewer rows than threads.
#include "rows.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <omp.h>
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <limits>
#include <mutex>
#include <vector>

namespace gvu {
namespace {

// A V-span below this is not worth a task: ~16K fp32 logits take ~10 us, several times the fork/join cost.
constexpr int64_t kMinSpan = 16384;

// Below ~32K logits per thread a fork/join costs more than it saves, and on a shared machine a descheduled
// worker stalls the barrier for a whole time slice (tiny calls took ~12 ms instead of ~20 us under load).
constexpr int64_t kMinWorkPerThread = 32768;

int num_threads(int64_t work) {
  if (omp_in_parallel()) return 1;
  const int64_t cap = std::max<int64_t>(1, work / kMinWorkPerThread);
  return static_cast<int>(std::min<int64_t>(std::max(1, at::get_num_threads()), cap));
}

size_t elem_size(DType dt) { return dt == DType::F32 ? 4 : 2; }

float load_one(const void* row, DType dt, int64_t i) {
  switch (dt) {
    case DType::F32:
      return static_cast<const float*>(row)[i];
    case DType::BF16:
      return static_cast<float>(static_cast<const c10::BFloat16*>(row)[i]);
    default:
      return static_cast<float>(static_cast<const c10::Half*>(row)[i]);
  }
}

void store_one(void* row, DType dt, int64_t i, float v) {
  switch (dt) {
    case DType::F32:
      static_cast<float*>(row)[i] = v;
      break;
    case DType::BF16:
      static_cast<c10::BFloat16*>(row)[i] = c10::BFloat16(v);
      break;
    default:
      static_cast<c10::Half*>(row)[i] = c10::Half(v);
  }
}

// Pieces per row: 1 when rows alone keep every thread busy (>= 4 rows each), else enough V-spans for ~4 tasks
// per thread, each at least kMinSpan long.
int64_t pieces_per_row(int64_t N, int64_t V, int nt) {
  if (nt <= 1 || N >= 4 * nt) return 1;
  const int64_t want = (4 * nt + N - 1) / N;
  return std::max<int64_t>(1, std::min<int64_t>(want, V / kMinSpan));
}

// z_i - m for one element, as the SIMD loops form it: they compute x * inv_t - m with one FMA (the AVX2 / AVX-512
// clones), i.e. from the exact product. A double product of two floats is exact, so this matches them to the
// final rounding; a float z_t = x * inv_t here instead put ulp(z) / 2 between the target's term and the rest of
// its row (5e-7 relative in p at |z| ~ 9).
double z_minus_m(const void* row, DType dt, int64_t i, float inv_t, float m) {
  return static_cast<double>(load_one(row, dt, i)) * inv_t - m;
}

const char* row_ptr(const void* base, DType dt, int64_t stride, int64_t r) {
  return static_cast<const char*>(base) + static_cast<size_t>(r) * static_cast<size_t>(stride) * elem_size(dt);
}

}  // namespace

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::F32;
    case at::kBFloat16:
      return DType::BF16;
    case at::kHalf:
      return DType::F16;
    default:
      TORCH_CHECK(false, "gvu_kernels: expected fp32, bf16 or fp16, got ", t.scalar_type());
  }
}

void advise_huge_pages(void* p, size_t bytes) {
#ifdef MADV_HUGEPAGE
  constexpr size_t kHuge = size_t{2} << 20;
  if (bytes < 4 * kHuge) return;
  const uintptr_t lo = (reinterpret_cast<uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t hi = (reinterpret_cast<uintptr_t>(p) + bytes) & ~(kHuge - 1);
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);  // a hint: failure is harmless
#endif
}

bool huge_pages_enabled() {
  static const bool on = [] {
    const char* v = std::getenv("GVU_KERNELS_THP");
    return v != nullptr && std::string(v) == "1";
  }();
  return on;
}

std::atomic<int64_t> reused_counts[2];

std::vector<int64_t> reuse_counts() { return {reused_counts[0].load(), reused_counts[1].load()}; }

at::Tensor reusable_rows(Reuse slot, int64_t N, int64_t V, const at::TensorOptions& opts, int64_t cache_bytes,
                         bool* fresh) {
  static std::mutex mu;
  static at::Tensor slots[2];  // each holds its buffer's storage: use_count 1 means no other tensor refers to it
  at::Tensor& kept = slots[static_cast<int>(slot)];
  const int64_t need = N * V * static_cast<int64_t>(c10::elementSize(c10::typeMetaToScalarType(opts.dtype())));
  std::lock_guard<std::mutex> lock(mu);
  if (cache_bytes <= 0) kept = at::Tensor();
  if (cache_bytes > 0 && need <= cache_bytes && kept.defined() && kept.storage().use_count() == 1 &&
      static_cast<int64_t>(kept.storage().nbytes()) >= need) {
    *fresh = false;
    reused_counts[static_cast<int>(slot)] += 1;
    return at::empty({0}, opts).set_(kept.storage(), 0, {N, V}, {V, 1});
  }
  *fresh = true;
  at::Tensor t = at::empty({N, V}, opts.memory_format(at::MemoryFormat::Contiguous));
  // the newest fitting one (a busy older one stays with its holder), through a TensorImpl of its own: the storage's
  // use count then counts exactly the tensors handed out that still live (not alias(): a view keeps its base)
  if (cache_bytes > 0 && need <= cache_bytes) kept = at::empty({0}, opts).set_(t.storage(), 0, {N, V}, {V, 1});
  return t;
}

void check_targets(const int64_t* tgt, int64_t N, int64_t V, int64_t ignore_index) {
  for (int64_t r = 0; r < N; ++r) {
    const int64_t t = tgt[r];
    TORCH_CHECK(t == ignore_index || (t >= 0 && t < V), "gvu_kernels: target ", t, " at row ", r,
                " is outside [0, ", V, ") and is not ignore_index=", ignore_index);
  }
}

void rows_forward(const void* x, DType dt, int64_t row_stride, int64_t N, int64_t V, const int64_t* tgt,
                  int64_t ignore_index, float inv_t, float* logp, float* lse, float* ent, float* stats) {
  if (N <= 0) return;
  const int nt = num_threads(N * V);
  const int64_t P = pieces_per_row(N, V, nt);
  const int64_t span = (V + P - 1) / P;
  const bool want_t = ent != nullptr;
  const size_t es = elem_size(dt);
  std::vector<SpanStats> part(static_cast<size_t>(N * P),
                              SpanStats{-std::numeric_limits<float>::infinity(), 0.0, 0.0});
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t k = 0; k < N * P; ++k) {
    const int64_t r = k / P, j = k % P;
    if (tgt[r] == ignore_index) continue;
    const int64_t lo = j * span, hi = std::min(V, lo + span);
    if (lo >= hi) continue;
    part[k] = span_stats(row_ptr(x, dt, row_stride, r) + lo * es, dt, hi - lo, inv_t, want_t);
  }
#pragma omp parallel for num_threads(N >= 1024 ? nt : 1) schedule(static)
  for (int64_t r = 0; r < N; ++r) {
    if (tgt[r] == ignore_index) {
      logp[r] = 0.0f;
      lse[r] = 0.0f;
      if (want_t) ent[r] = 0.0f;
      if (stats) stats[2 * r] = stats[2 * r + 1] = 0.0f;
      continue;
    }
    SpanStats st = part[r * P];
    for (int64_t j = 1; j < P; ++j) merge_stats(st, part[r * P + j]);
    const double log_s = std::log(st.s);
    lse[r] = static_cast<float>(static_cast<double>(st.m) + log_s);
    // log p <= 0: the exact product can sit an ulp above m where the row's sum of exp rounded to 1 (V = 1).
    const double lp = z_minus_m(row_ptr(x, dt, row_stride, r), dt, tgt[r], inv_t, st.m) - log_s;
    logp[r] = static_cast<float>(std::min(lp, 0.0));
    if (stats) {
      stats[2 * r] = st.m;
      stats[2 * r + 1] = static_cast<float>(log_s);
    }
    if (want_t) ent[r] = static_cast<float>(log_s - st.t / st.s);
  }
}

void rows_backward(const void* x, DType dt, int64_t row_stride, void* out, DType out_dt, int64_t out_stride,
                   int64_t N, int64_t V, const int64_t* tgt, int64_t ignore_index, float inv_t, const float* g_logp,
                   const float* g_lse, const float* g_ent, const float* stats, const float* ent) {
  if (N <= 0) return;
  const int nt = num_threads(N * V);
  const int64_t P = pieces_per_row(N, V, nt);
  const int64_t span = (V + P - 1) / P;
  const size_t es = elem_size(dt), oes = elem_size(out_dt);
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t k = 0; k < N * P; ++k) {
    const int64_t r = k / P, j = k % P;
    const int64_t lo = j * span, hi = std::min(V, lo + span);
    if (lo >= hi) continue;
    char* orow = static_cast<char*>(out) + static_cast<size_t>(r) * static_cast<size_t>(out_stride) * oes;
    const int64_t t = tgt[r];
    if (t == ignore_index) {
      std::memset(orow + lo * oes, 0, static_cast<size_t>(hi - lo) * oes);
      continue;
    }
    const float gl = g_logp ? g_logp[r] : 0.0f;
    const float c0 = (g_lse ? g_lse[r] : 0.0f) - gl;
    const float c1 = g_ent ? g_ent[r] : 0.0f;
    const float h = g_ent ? ent[r] : 0.0f;
    const char* xrow = row_ptr(x, dt, row_stride, r);
    const float m = stats[2 * r], log_s = stats[2 * r + 1];
    // Read the target logit before the span is overwritten (in place when out aliases x).
    const bool here = t >= lo && t < hi;
    const double d = here ? std::min(z_minus_m(xrow, dt, t, inv_t, m) - log_s, 0.0) : 0.0;  // log p_t
    span_grad(xrow + lo * es, dt, orow + lo * oes, out_dt, hi - lo, inv_t, m, log_s, c0, c1, h);
    if (here) {
      // The one-hot term, computed once in fp32 so a bf16/fp16 output is rounded once.
      const double p = std::exp(d);
      const double g = p * (c0 - c1 * (d + h)) + gl;
      store_one(orow, out_dt, t, static_cast<float>(g * inv_t));
    }
  }
}

}  // namespace gvu

namespace gvu {

void cols_backward(void* x, DType dt, int64_t V, int64_t N, const int64_t* tgt, float inv_t, const float* g_logp,
                   const float* g_lse, const float* g_ent, const float* stats, const float* ent) {
  if (N <= 0 || V <= 0) return;
  // Per-token numbers as arrays the column loop reads alongside x: m, log s, c0, c1, h.
  std::vector<float> buf(static_cast<size_t>(5 * N));
  float* k[5];
  for (int j = 0; j < 5; ++j) k[j] = buf.data() + j * N;
  std::vector<double> dt_logp(static_cast<size_t>(N), 0.0);  // log p at each token's target, if in this block
  const size_t es = elem_size(dt);
  for (int64_t r = 0; r < N; ++r) {
    k[0][r] = stats[2 * r];
    k[1][r] = stats[2 * r + 1];
    k[2][r] = (g_lse ? g_lse[r] : 0.0f) - (g_logp ? g_logp[r] : 0.0f);
    k[3][r] = g_ent ? g_ent[r] : 0.0f;
    k[4][r] = g_ent ? ent[r] : 0.0f;
    const int64_t t = tgt[r];
    if (t >= 0 && t < V) {  // read before the in-place pass overwrites it
      const char* row = static_cast<const char*>(x) + static_cast<size_t>(t) * static_cast<size_t>(N) * es;
      dt_logp[r] = std::min(z_minus_m(row, dt, r, inv_t, k[0][r]) - k[1][r], 0.0);
    }
  }
  const int nt = num_threads(N * V);
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t v = 0; v < V; ++v) {
    char* row = static_cast<char*>(x) + static_cast<size_t>(v) * static_cast<size_t>(N) * es;
    col_grad(row, dt, row, dt, N, inv_t, k);
  }
  for (int64_t r = 0; r < N; ++r) {  // the one-hot terms, in double as rows_backward forms them
    const int64_t t = tgt[r];
    if (t < 0 || t >= V) continue;
    const double d = dt_logp[r], p = std::exp(d);
    const double g = p * (k[2][r] - k[3][r] * (d + k[4][r])) + (g_logp ? g_logp[r] : 0.0f);
    store_one(static_cast<char*>(x) + static_cast<size_t>(t) * static_cast<size_t>(N) * es, dt, r,
              static_cast<float>(g * inv_t));
  }
}

}  // namespace gvu

#include <cpuid.h>

namespace gvu {

bool native_bf16() {
#if defined(__x86_64__)
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 1, &a, &b, &c, &d)) return false;
  const bool avx512_bf16 = (a >> 5) & 1u;  // CPUID.(7,1):EAX[5]
  __get_cpuid_count(7, 0, &a, &b, &c, &d);
  const bool amx_bf16 = (d >> 22) & 1u;  // CPUID.(7,0):EDX[22]
  return avx512_bf16 || amx_bf16;
#else
  return true;  // not x86: leave bf16 GEMMs to torch
#endif
}

bool fp32_tiles() {
  static const bool on = [] {
    const char* v = std::getenv("GVU_KERNELS_FP32_TILES");
    if (v != nullptr && (std::string(v) == "1" || std::string(v) == "0")) return std::string(v) == "1";
    return !native_bf16();
  }();
  return on;
}

}  // namespace gvu
