// group_advantages: GRPO advantages from rewards (B*G,) in consecutive groups of G, in fp64 like the reference.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>


namespace gvu {

at::Tensor group_advantages_op(const at::Tensor& rewards_in, int64_t group_size, double eps, c10::string_view scale,
                               bool unbiased) {
  TORCH_CHECK(rewards_in.dim() == 1, "gvu_kernels: rewards must be 1-D (B*G,), got ", rewards_in.sizes());
  TORCH_CHECK(rewards_in.is_floating_point(), "gvu_kernels: rewards must be floating point, got ",
              rewards_in.scalar_type());
  const int64_t M = rewards_in.size(0);
  TORCH_CHECK(group_size >= 1 && M % group_size == 0, "gvu_kernels: rewards has ", M,
              " entries, not a multiple of group_size=", group_size);
  const bool by_group = scale == "group", by_batch = scale == "batch";
  TORCH_CHECK(by_group || by_batch || scale == "none", "gvu_kernels: scale must be group, batch or none, got ",
              std::string(scale));
  at::Tensor out = at::zeros({M}, rewards_in.options().dtype(at::kFloat));
  if (M == 0) return out;
  const at::Tensor r64 = rewards_in.detach().to(at::kDouble).contiguous();
  const double* r = r64.data_ptr<double>();
  float* a = out.data_ptr<float>();
  const int64_t B = M / group_size;

  double batch_std = 0.0;
  if (by_batch) {  // two-pass std over every valid reward
    int64_t n = 0;
    double sum = 0.0;
    for (int64_t i = 0; i < M; ++i)
      if (!std::isnan(r[i])) sum += r[i], ++n;
    const int64_t ddof = unbiased ? 1 : 0;
    if (n > ddof) {
      const double mean = sum / n;
      double ss = 0.0;
      for (int64_t i = 0; i < M; ++i)
        if (!std::isnan(r[i])) ss += (r[i] - mean) * (r[i] - mean);
      batch_std = std::sqrt(ss / (n - ddof));
    }
  }
  // Groups are tiny (G ~ 4-64) and independent; one thread per batch of groups.
#pragma omp parallel for schedule(static) if (M >= (1 << 16))
  for (int64_t b = 0; b < B; ++b) {
    const double* g = r + b * group_size;
    int64_t n = 0;
    double sum = 0.0, lo = std::numeric_limits<double>::infinity(), hi = -lo;
    for (int64_t j = 0; j < group_size; ++j) {
      if (std::isnan(g[j])) continue;
      ++n;
      sum += g[j];
      lo = std::min(lo, g[j]);
      hi = std::max(hi, g[j]);
    }
    if (n < 2 || !(hi - lo > 0)) continue;  // dead group: advantages stay 0
    const double mean = sum / n;
    double denom = 1.0;
    if (by_group) {
      double ss = 0.0;
      for (int64_t j = 0; j < group_size; ++j)
        if (!std::isnan(g[j])) ss += (g[j] - mean) * (g[j] - mean);
      denom = std::sqrt(ss / std::max<int64_t>(unbiased ? n - 1 : n, 1)) + eps;
    } else if (by_batch) {
      denom = batch_std + eps;
    }
    for (int64_t j = 0; j < group_size; ++j)
      if (!std::isnan(g[j])) a[b * group_size + j] = static_cast<float>((g[j] - mean) / denom);
  }
  return out;
}

}  // namespace gvu

// Schemas and CPU implementations of this op (a fragment of the gvu_kernels library: each op registers its
// own, as kernels/cpp_ops/<op>.py registers its fake kernels and autograd).
TORCH_LIBRARY_FRAGMENT(gvu_kernels, m) {
  m.def("group_advantages(Tensor rewards, int group_size, float eps, str scale, bool unbiased) -> Tensor");
}

TORCH_LIBRARY_IMPL(gvu_kernels, CPU, m) {
  m.impl("group_advantages", &gvu::group_advantages_op);
}
