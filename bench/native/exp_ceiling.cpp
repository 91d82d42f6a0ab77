// The token forward's ceilings on this CPU, from the shipped row kernels (kernels/csrc/row_kernels.cpp) with no
// torch in the way: what one exp pass costs with its data in L1 (compute alone), what a plain read costs (memory
// alone), and what the forward's span_stats does streaming rows from memory, at T threads (OpenMP, rows split).
// If the streamed rate sits well below min(L1 rate, read rate), compute and memory are not overlapping.
//
//   bash bench/native/exp_ceiling.sh            # builds into /tmp, runs at 1 and 2 threads, appends results CSV
//
// Output (one line per dtype x threads): G logits/s for l1 (a 2048-logit block, repeated), stream (N x V rows
// once each, every thread its share), read (a vector sum over the same bytes; bf16 words summed as integers, as
// cheap), each a median of 7 interleaved runs.
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "row_kernels.h"

using gvu::DType;
using Clock = std::chrono::steady_clock;

static double secs(Clock::time_point a) { return std::chrono::duration<double>(Clock::now() - a).count(); }

int main(int argc, char** argv) {
  const int threads = argc > 1 ? std::atoi(argv[1]) : 1;
  const int64_t N = 2048, V = 32000, kBlock = 2048;
  std::vector<float> f32(N * V);
  std::vector<uint16_t> b16(N * V);
  std::mt19937 g(0);
  std::normal_distribution<float> nd(0.0f, 3.0f);
  for (size_t i = 0; i < f32.size(); ++i) {
    f32[i] = nd(g);
    uint32_t u;
    std::memcpy(&u, &f32[i], 4);
    b16[i] = static_cast<uint16_t>(u >> 16);
  }
  omp_set_num_threads(threads);
  volatile double sink = 0;
  for (DType dt : {DType::F32, DType::BF16}) {
    const char* base = dt == DType::F32 ? reinterpret_cast<const char*>(f32.data())
                                        : reinterpret_cast<const char*>(b16.data());
    const size_t es = dt == DType::F32 ? 4 : 2;
    std::vector<double> l1, stream, read;
    for (int rep = 0; rep < 7; ++rep) {
      auto t0 = Clock::now();
      const int64_t iters = 20000;
#pragma omp parallel for schedule(static) reduction(+ : sink)
      for (int64_t i = 0; i < iters * threads; ++i) sink += gvu::span_stats(base, dt, kBlock, 1.0f, false).s;
      l1.push_back(iters * threads * kBlock / secs(t0) / 1e9);
      t0 = Clock::now();
#pragma omp parallel for schedule(static) reduction(+ : sink)
      for (int64_t r = 0; r < N; ++r) sink += gvu::span_stats(base + r * V * es, dt, V, 1.0f, false).s;
      stream.push_back(N * V / secs(t0) / 1e9);
      t0 = Clock::now();
      double acc = 0;
#pragma omp parallel for schedule(static) reduction(+ : acc)
      for (int64_t r = 0; r < N; ++r) {
        float s[16] = {0};
        if (dt == DType::F32) {
          const float* x = f32.data() + r * V;
          for (int64_t i = 0; i < V; i += 16)
            for (int j = 0; j < 16; ++j) s[j] += x[i + j];
        } else {
          const uint16_t* x = b16.data() + r * V;
          for (int64_t i = 0; i < V; i += 16)
            for (int j = 0; j < 16; ++j) s[j] += static_cast<float>(x[i + j]);
        }
        for (int j = 0; j < 16; ++j) acc += s[j];
      }
      sink += acc;
      read.push_back(N * V / secs(t0) / 1e9);
    }
    auto med = [](std::vector<double> v) { std::sort(v.begin(), v.end()); return v[v.size() / 2]; };
    std::printf("%s,%d,%s,%.3f,%.3f,%.3f\n", dt == DType::F32 ? "fp32" : "bf16", threads, gvu::simd_level(),
                med(l1), med(stream), med(read));
  }
  return 0;
}
