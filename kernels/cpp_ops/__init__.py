"""C++ CPU ops (kernels/csrc), one module per op: fake kernels, autograd and the backend function `<op>_cpp`.

Ops (namespace `gvu_kernels`), all on 2-D rows with fp32 outputs; the schemas are in kernels/csrc/<op>.cpp:
    token_logprobs(logits (N, V), targets (N,), T, ignore_index, return_entropy) -> logp, lse, entropy (N,)|(0,)
    linear_token_logprobs(hidden (N, D), weight (V, D), targets, bias?, T, ignore_index, return_entropy,
                          chunk_size) -> logp, lse, entropy
    linear_token_logprobs_frozen(same arguments) -> logp, lse, entropy, cen (N, D), ent_dir (N, D)|(0, 0)
    linear_token_logprobs_saved(same arguments) -> logp, lse, entropy, logits (N, V) (kept rows first)
    group_advantages(rewards (M,), group_size, eps, scale, unbiased) -> (M,)
"""

from kernels.cpp_ops._lib import available, default_chunk_size, library_path, load_error, simd_level
from kernels.cpp_ops.group_advantages import group_advantages_cpp
from kernels.cpp_ops.linear_token_logprobs import linear_token_logprobs_cpp
from kernels.cpp_ops.token_logprobs import token_logprobs_cpp

__all__ = [
    "available",
    "load_error",
    "library_path",
    "simd_level",
    "default_chunk_size",
    "token_logprobs_cpp",
    "linear_token_logprobs_cpp",
    "group_advantages_cpp",
]
