"""Rollout: the KV-cache decode loop every backend shares, and the per-step logits -> token functions.

A backend knows its sequence layout (how a prefix is embedded, what is fed after a sampled code, which head gives
the code logits); `sample_images` runs the loop with no waste:
- each prompt is prefilled once (with its unconditional CFG row) and its cache copied to its G samples once;
- the KV cache is preallocated for the whole image (gvu/kv_cache.py): a step writes its keys in place and the
  attention reads a view, where transformers' DynamicCache copies the whole cache every step (torch.cat);
- conditional and unconditional rows run in the same forward; per step only the code logits are formed, and
  when sampling with CFG the two branches are combined before the head's last Linear (`HeadParts`), so its
  widest GEMM runs on half the rows;
- no host synchronisation per step: sampling draws one uniform per row and inverts the CDF on the device
  (torch.multinomial draws V exponentials per row).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from gvu.config import SamplingConfig  # the sampling settings live with the other config sections
from gvu.kv_cache import PreallocatedCache
from gvu.models.wrapping import partitioned

__all__ = [
    "AffineProjection",
    "HeadParts",
    "PreallocatedCache",
    "SamplingConfig",
    "cfg_combine",
    "filter_logits",
    "prompt_groups",
    "sample_images",
    "sample_next",
]


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance on logits: uncond + s * (cond - uncond). (N, V) -> (N, V)."""
    return uncond + scale * (cond - uncond)


class HeadParts(NamedTuple):
    """A code head split at its last Linear: logits(h) == project(features(h)), `project` affine.

    features(h (rows, D)) -> (rows, F); project(f (rows, F)) -> logits (rows, K). An affine map commutes with
    CFG's extrapolation (whose weights sum to 1): project(f_u + s (f_c - f_u)) = z_u + s (z_c - z_u), so sampling
    combines the branches on F features and projects n rows instead of 2n (exact in real arithmetic; it rounds
    differently, so greedy decoding keeps the logit-space formula and its bitwise parity with transformers).
    """

    features: Callable[[torch.Tensor], torch.Tensor]
    project: Callable[[torch.Tensor], torch.Tensor]


class AffineProjection(torch.nn.Module):
    """f (rows, F) -> f @ weight.T + bias for a frozen fp32 (K, F) weight, called once per decode step.

    On CPU with MKL through its packed GEMM (`torch.ops.mkl._mkl_linear`, what inductor's freezing uses), the weight
    packed once per rollout and row count: at a few rows the head's GEMM streams its whole weight each step, out of
    cache between steps, and the packed weight reads faster (Janus-Pro's 16384 x 256 head, fp32, one thread, in the
    decode loop, `python bench/rollout.py --shapes real --profile`: 1.1-1.7 ms a step packed at 8 rows, 2.2 ms for
    F.linear at the 16 rows greedy decoding runs). The packed copy takes ~3x the weight's memory.
    Elsewhere (other devices and dtypes, no MKL) `F.linear` as it is. A Module, so that forward hooks (the rollout
    benchmark's time inside the model) see it as the head's layer it is.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.weight, self.bias = weight.detach(), None if bias is None else bias.detach()
        mkl = getattr(torch.ops.mkl, "_mkl_linear", None) if torch.backends.mkl.is_available() else None
        self.mkl = mkl if weight.device.type == "cpu" and weight.dtype == torch.float32 else None
        self.packed: dict[int, torch.Tensor] = {}

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        if self.mkl is None:
            return torch.nn.functional.linear(f, self.weight, self.bias)
        m = f.shape[0]
        if m not in self.packed:
            self.packed[m] = torch.ops.mkl._mkl_reorder_linear_weight(self.weight, m)
        return self.mkl(f, self.packed[m], self.weight, self.bias, m)


def filter_logits(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Temperature-scaled, top-k / top-p / min-p filtered fp32 logits (N, V); filtered entries are -inf."""
    z = logits.float() if cfg.temperature == 1 else logits.float() / cfg.temperature  # x / 1 is exact: skip the pass
    V = z.shape[-1]
    if cfg.top_k and cfg.top_k < V:
        kth = torch.topk(z, cfg.top_k, dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if cfg.min_p > 0:
        p = torch.softmax(z, dim=-1)
        z = z.masked_fill(p < cfg.min_p * p.amax(-1, keepdim=True), float("-inf"))
    if cfg.top_p < 1:
        sorted_z, idx = torch.sort(z, dim=-1, descending=True)
        cum = torch.softmax(sorted_z, dim=-1).cumsum(-1)
        # keep the smallest prefix whose mass reaches top_p (the first token is always kept)
        drop_sorted = (cum - torch.softmax(sorted_z, dim=-1)) >= cfg.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, idx, drop_sorted)
        z = z.masked_fill(drop, float("-inf"))
    return z


def sample_next(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row from logits (N, V) -> (N,) int64, by inverting the CDF at one uniform per row.

    The CDF is the running sum of exp(z - max) (CPU accumulates it in double, CUDA in a parallel fp32 scan), so a
    token is drawn with its probability up to ~1e-7 of the total mass. A filtered (-inf) token is never drawn: a
    draw that rounds up to the total mass is clamped to the last token with mass.
    """
    if cfg.greedy:
        return logits.argmax(-1)
    z = filter_logits(logits, cfg)
    cdf = (z - z.amax(-1, keepdim=True)).exp_().cumsum_(-1)
    total = cdf[:, -1:].contiguous()
    u = torch.rand((cdf.shape[0], 1), generator=generator, device=cdf.device, dtype=cdf.dtype)
    idx = torch.searchsorted(cdf, u * total, right=True)  # the first token whose CDF exceeds the draw
    last = torch.searchsorted(cdf, total)  # the first token whose CDF reaches the total: the last one with mass
    return torch.minimum(idx, last).squeeze(-1)


def prompt_groups(num_prompts: int, num_samples: int, rows: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Chunks of at most `rows` of the B*G rollout rows, each as (prompt indices (u,), samples per prompt (u,)).

    Row b*G + g is sample g of prompt b; a chunk holds consecutive rows, so a prompt's samples may span two chunks.
    """
    n, out = num_prompts * num_samples, []
    for s in range(0, n, rows):
        prompt = torch.arange(s, min(s + rows, n)) // num_samples
        idx, counts = torch.unique_consecutive(prompt, return_counts=True)
        out.append((idx, counts))
    return out


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of left-padded rows: 0 at the first real token (pads get 0 too; attention ignores them)."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


def _num_layers(body: torch.nn.Module) -> int:
    config = body.config.get_text_config(decoder=True) if hasattr(body.config, "get_text_config") else body.config
    return config.num_hidden_layers


Feed = Callable[[torch.Tensor, int], dict]


@torch.no_grad()
def sample_images(
    body: torch.nn.Module,
    prefix: dict,
    mask: torch.Tensor,
    counts: torch.Tensor,
    *,
    steps: int,
    fed_len: int,
    feed: Feed,
    logits: Callable[[torch.Tensor], torch.Tensor],
    sampling: SamplingConfig,
    width: Callable[[int], int] = lambda t: 1,
    generator: torch.Generator | None = None,
    uncond: tuple[dict, torch.Tensor] | None = None,
    cfg_space: str = "logits",
    static: bool | None = None,
    head: HeadParts | None = None,
) -> torch.Tensor:
    """Sample `counts[i]` images for each of u prompts -> codes int64 (sum(counts), steps), rows grouped by prompt.

    body: the decoder (a transformers base model taking input_ids or inputs_embeds, attention_mask, position_ids,
        past_key_values) whose last hidden state predicts the next code.
    prefix: the forward's token input for the u left-padded prefixes, {"input_ids": (u, P)} or {"inputs_embeds":
        (u, P, D)}; mask: bool/long (u, P), True at real tokens.
    uncond: (prefix, mask) of the u unconditional rows when sampling.cfg_scale > 1 (same P).
    feed(codes (n,), t) -> the forward's token input {"input_ids": (n, k)} or {"inputs_embeds": (n, k, D)} after
        code t, with k = width(t) >= 1 tokens (a layout may force tokens, e.g. the toy's end of row); fed_len: an
        upper bound of the tokens fed over the whole image (the cache is allocated for P + fed_len).
    logits(h (rows, D)) -> the code logits (rows, K); cfg_space "logprobs" combines log-softmaxed branches (X-Omni).
    head: the same head split at its last Linear; when given, sampling (not greedy) forms its logits through it,
        with CFG in logit space combined on the features (HeadParts). Greedy decoding always calls `logits`.
    static: decode with fixed shapes (the cache's whole buffers and a 4D mask), captured in a CUDA graph per step
        width on CUDA; None: on CUDA when sampling.cuda_graph. A capture that fails is logged and the same static
        step runs eagerly.
    """
    cfg = uncond is not None
    u, P = mask.shape
    n = int(counts.sum())
    if generator is not None and generator.device != mask.device:
        # one seed from the caller's (CPU) generator: a generator on the device draws without a host round trip
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        generator = torch.Generator(mask.device).manual_seed(seed)
    if cfg:
        key = next(iter(prefix))
        prefix = {key: torch.cat([prefix[key], uncond[0][key]])}
        mask = torch.cat([mask, uncond[1]])
    mask = mask.long()
    pos = _positions(mask)
    cache = PreallocatedCache(_num_layers(body), P + fed_len)
    h = body(**prefix, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
    # each prompt's cache (and its unconditional row's) goes to its samples once
    rep = torch.repeat_interleave(torch.arange(u, device=mask.device), counts.to(mask.device))
    index = torch.cat([rep, rep + u]) if cfg else rep
    cache.select_rows(index)
    h = h.last_hidden_state[index, -1]
    full_mask = torch.ones((index.shape[0], P + fed_len), dtype=torch.long, device=mask.device)
    full_mask[:, :P] = mask[index]

    s = sampling.cfg_scale

    split = head is not None and not sampling.greedy and cfg_space == "logits"

    def next_logits(h: torch.Tensor) -> torch.Tensor:
        if split:
            f = head.features(h)
            if cfg:  # in fp32, rounded once to the head's dtype: no coarser than rounding each branch's logits
                f = torch.lerp(f[n:].float(), f[:n].float(), s).to(f.dtype)
            return head.project(f).float()
        z = logits(h).float()
        if cfg:
            z = z.log_softmax(-1) if cfg_space == "logprobs" else z
            # greedy: transformers' own formula, so argmax parity is bitwise; sampling: the same line in one pass
            # (torch.lerp extrapolates at weights > 1; it rounds differently, which only sampling sees)
            z = cfg_combine(z[:n], z[n:], s) if sampling.greedy else torch.lerp(z[n:], z[:n], s)
        return z

    def forward(tok: torch.Tensor, t: int, mask_now, positions) -> torch.Tensor:
        """The step after code t: feed, one body forward, the next code's (CFG-combined) logits."""
        step = feed(tok, t)
        if cfg:
            step = {k: torch.cat([v, v]) for k, v in step.items()}
        out = body(**step, attention_mask=mask_now, position_ids=positions, past_key_values=cache, use_cache=True)
        return next_logits(out.last_hidden_state[:, -1])

    attn = getattr(body.config, "_attn_implementation", "sdpa")
    if static is None:
        static = mask.device.type == "cuda" and sampling.cuda_graph and _graph_safe(body, attn)
    args = (cache, forward, next_logits(h), full_mask, pos[index, -1:] + 1, P, n, steps, width, sampling, generator)
    return _static_steps(*args, attn=attn) if static else _dynamic_steps(*args, attn=attn)


def _graph_safe(body: torch.nn.Module, attn: str) -> bool:
    """Whether the decode step can be captured in a CUDA graph; logs why not."""
    if attn not in ("sdpa", "eager"):  # flash-attn's padding path unpads with a host sync; it takes no 4D mask
        log_once(f"rollout: no CUDA graph with attn_implementation={attn} (it needs sdpa or eager); decoding eagerly")
        return False
    if partitioned(body.parameters()):  # ZeRO-3 gathers parameters per forward
        log_once("rollout: no CUDA graph under ZeRO-3 (parameters are gathered per forward); decoding eagerly")
        return False
    return True


def _dynamic_steps(cache, forward, z, full_mask, next_pos, T, n, steps, width, sampling, generator, attn="sdpa"):
    """The decode loop over a growing view of the cache: attention reads only the filled part. With SDPA the mask
    goes in as a 4D boolean view (rows, 1, 1, T) of one preallocated tensor, which transformers passes through as
    it is, instead of rebuilding it from the 2D mask every step (the same booleans); other attentions get the 2D."""
    dev = full_mask.device
    keys = full_mask.bool()[:, None, None, :] if attn == "sdpa" else None
    cols = torch.arange(full_mask.shape[1], device=dev)
    out = torch.empty((n, steps), dtype=torch.long, device=dev)
    for t in range(steps):
        tok = sample_next(z, sampling, generator)
        out[:, t] = tok
        if t == steps - 1:
            break
        k = width(t)
        T += k
        ar = torch.arange(k, device=dev)
        if keys is None:
            mask_now = full_mask[:, :T]
        elif k == 1:
            mask_now = keys[..., :T]
        else:  # a step of k tokens: query i sees the keys up to its own position T - k + i
            mask_now = keys[..., :T] & (cols[:T] <= (T - k + ar)[:, None])
        z = forward(tok, t, mask_now, next_pos + ar)
        next_pos = next_pos + k
    return out


def _static_steps(cache, forward, z, full_mask, next_pos, T, n, steps, width, sampling, generator, attn="sdpa"):
    """The decode loop with fixed shapes: the cache's whole buffers, a 4D mask (rows, 1, k, C) hiding what is not
    written yet (and, within a step of k > 1 tokens, what is causally later), positions and write offsets in device
    buffers updated in place. On CUDA each step width's forward is captured in a CUDA graph once and replayed, so a
    step costs one launch instead of one per kernel; the host never waits on the device (sampling stays outside)."""
    dev = full_mask.device
    rows, C = full_mask.shape
    seen = full_mask.bool().clone()
    seen[:, T:] = False  # (rows, C): the keys any query may attend to so far
    cols = torch.arange(C, device=dev)
    tok_buf = torch.zeros(n, dtype=torch.long, device=dev)
    dtype = cache.layers[0].k_buf.dtype
    per_width: dict[int, _StaticStep] = {}
    out = torch.empty((n, steps), dtype=torch.long, device=dev)
    for t in range(steps):
        tok = sample_next(z, sampling, generator)
        out[:, t] = tok
        if t == steps - 1:
            break
        k = width(t)
        s = per_width.get(k)
        if s is None:
            s = per_width[k] = _StaticStep(k, rows, C, dev, dtype if attn == "eager" else torch.bool)
        tok_buf.copy_(tok)
        ar = torch.arange(k, device=dev)
        s.write_at.copy_(T + ar)
        s.positions.copy_(next_pos + ar)
        seen[:, T : T + k] = True
        allow = seen[:, None, None, :] & (cols <= (T + ar)[:, None])  # (rows, 1, k, C)
        # sdpa takes the boolean mask as it is; eager adds it to the scores
        s.mask.copy_(allow if attn != "eager" else torch.where(allow, 0.0, torch.finfo(dtype).min))
        cache.make_static(s.write_at)
        z = s.run(lambda s=s, t=t: forward(tok_buf, t, s.mask, s.positions))
        T, next_pos = T + k, next_pos + k
    return out


class _StaticStep:
    """The device buffers of one step width k and, on CUDA, its captured graph."""

    def __init__(self, k: int, rows: int, C: int, dev, mask_dtype):
        self.write_at = torch.zeros(k, dtype=torch.long, device=dev)
        self.positions = torch.zeros((rows, k), dtype=torch.long, device=dev)
        self.mask = torch.zeros((rows, 1, k, C), dtype=mask_dtype, device=dev)
        self.graph, self.out, self.tried = None, None, dev.type != "cuda"

    def run(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        if self.graph is not None:
            self.graph.replay()
            return self.out
        if not self.tried:
            self.tried = True
            try:
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    fn()  # warm-up (allocations, lazy inits); it writes what this step writes, so it is idempotent
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    self.out = fn()
                self.graph = graph
                graph.replay()
                return self.out
            except Exception as e:  # noqa: BLE001 -- any capture failure falls back to the same step, eagerly
                log_once(f"rollout: CUDA graph capture failed ({type(e).__name__}: {str(e)[:160]}); "
                         "decoding with fixed shapes, without graphs")  # fmt: skip
        return fn()


_LOGGED: set[str] = set()


def log_once(msg: str) -> None:
    """Print `msg` once per process, on rank 0 only."""
    import torch.distributed as dist

    if msg not in _LOGGED and (not dist.is_initialized() or dist.get_rank() == 0):
        _LOGGED.add(msg)
        print(msg, flush=True)
