"""Rollout throughput: our adapters' batched KV-cache `generate` vs transformers `model.generate`.

    python bench/rollout.py                 # every model (--model toy|janus|xomni|all), 5 repeats
    python bench/rollout.py --quick         # one 2x2 batch per model, 1 repeat (the smoke test)
    python bench/rollout.py --shapes real   # Janus-Pro's layout, small body: ours vs HF generate as shipped and
                                            # HF generate with a static cache + compiled forward, B {1,4,16} x G {8,16}

toy (B prompts x G samples in 1x8 4x8 16x8 16x16): both sample the same images from the same model and prefixes:
ours feeds a row's last code and its forced <eor> in one forward (36 forwards per image) and computes only the
K=121 code logits; HF runs 42 one-token forwards with full-vocabulary logits, restricted by `ImageLayoutProcessor`.
janus (a tiny random Janus, _common.load_janus; same BxG): JanusUMM.generate (CFG 5, conditional and
unconditional rows in one DynamicCache batch) vs `JanusForConditionalGeneration.generate(generation_mode="image",
guidance_scale=5)` (static cache, generation head on both branches, ClassifierFreeGuidanceLogitsProcessor), each
prompt repeated G times for both; sampling is plain temperature 1 (HF: top_k=0, top_p=1).
xomni (the tiny X-Omni fixture, _common.load_xomni; 8 x 8 codes): XOmniUMM.generate (CFG 3, both branches in one
batch) vs XOmniForCausalLM.generate in image mode with transformers' UnbatchedClassifierFreeGuidanceLogitsProcessor
(the released path: a second model call per step on the negative prompt), min-p 0.03 as the released rollout.
--shapes 1b: the same at Janus-Pro-1B's published shapes (2.1B parameters, bf16; `--device cuda`; greedy agreement
recorded as the fraction of equal tokens, since bf16 rounding depends on batch shapes), what scripts/gpu_check.sh runs.
--shapes real (Janus only; _common.load_janus(real_layout=True): 576 codes of 16384, 384 px, the chat format, a
Llama d=256 x 2 body): baselines (a) `generate(generation_mode="image", guidance_scale=5)` as shipped (it already
builds a static cache) and (b) the same with cache_implementation="static" and `torch.compile` of the language
model's forward (the one the image loop calls), compile time excluded (the parity run compiles); a row says
"skipped: <reason>" when (b) does not run. `outside_share`: the share of a rollout's wall time spent outside the
model's modules (body, generation head, embeddings, aligner), from forward hooks in one extra untimed run.
Greedy outputs must be identical (asserted; for (b) recorded). Baseline and ours run interleaved in the same
process; ratios are HF seconds / our seconds.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # the repo first, so `import kernels` finds the package
import _common as C  # noqa: E402
import torch  # noqa: E402
from transformers import LogitsProcessor, LogitsProcessorList  # noqa: E402

from gvu.rollout import SamplingConfig  # noqa: E402
from gvu.toy import prompts as WP  # noqa: E402


class ImageLayoutProcessor(LogitsProcessor):
    """Makes HF generate emit a valid toy image: at row ends only <eor>, elsewhere only the image codes.

    `prefix_len` is the (left-padded) prefix length, so the step index is input_ids.shape[1] - prefix_len.
    """

    def __init__(self, adapter, prefix_len: int):
        self.prefix_len = prefix_len
        self.row = adapter.row
        self.eor = adapter.eor
        self.codes = slice(adapter.code_offset, adapter.code_offset + adapter.num_codes)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        t = input_ids.shape[1] - self.prefix_len
        out = torch.full_like(scores, float("-inf"))
        if (t + 1) % (self.row + 1) == 0:
            out[:, self.eor] = 0.0
        else:
            out[:, self.codes] = scores[:, self.codes]
        return out


def hf_generate(adapter, model, prompts, num_samples: int, greedy: bool, seed: int = 0) -> torch.Tensor:
    """transformers generate on the same prefixes -> codes int64 (B*G, 36), checked to be a valid layout."""
    rows = prompts.repeat_interleave(num_samples)
    ids, mask = rows.gen_ids, rows.gen_mask.long()
    proc = LogitsProcessorList([ImageLayoutProcessor(adapter, ids.shape[1])])
    kw = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
    torch.manual_seed(seed)  # HF samples from the global generator
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=adapter.layout_len,
            min_new_tokens=adapter.layout_len,
            logits_processor=proc,
            pad_token_id=adapter.pad,
            eos_token_id=None,
            **kw,
        )
    lay = out[:, ids.shape[1] :].view(-1, adapter.row, adapter.row + 1)
    if not bool((lay[:, :, -1] == adapter.eor).all()):
        raise AssertionError("HF generate produced a row without its closing <eor>")
    return lay[:, :, :-1].reshape(-1, adapter.image_len) - adapter.code_offset


def ours_generate(adapter, model, prompts, num_samples: int, greedy: bool, seed: int = 0) -> torch.Tensor:
    s = SamplingConfig(greedy=True) if greedy else SamplingConfig(temperature=1.0)
    return adapter.generate(model, prompts, num_samples, s, generator=torch.Generator().manual_seed(seed))


JANUS_CFG = 5.0  # Janus-Pro's default guidance scale, for ours and HF alike


def janus_hf_generate(adapter, model, prompts, num_samples: int, greedy: bool, seed: int = 0) -> torch.Tensor:
    """JanusForConditionalGeneration.generate(generation_mode="image") on each prompt G times -> codes (B*G, L).

    HF refuses num_return_sequences > 1 when greedy, so the prefixes are repeated instead (what its own
    expansion does for sampling)."""
    kw = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
    torch.manual_seed(seed)  # HF samples from the global generator
    with torch.no_grad():
        return model.generate(
            prompts.gen_ids.repeat_interleave(num_samples, 0),
            attention_mask=prompts.gen_mask.long().repeat_interleave(num_samples, 0),
            generation_mode="image",
            guidance_scale=JANUS_CFG,
            **kw,
        )


_COMPILED: dict = {}  # id(language model) -> its compiled forward, built once (the compile is excluded from timing)


def janus_hf_compiled_generate(adapter, model, prompts, num_samples: int, greedy: bool, seed: int = 0):
    """janus_hf_generate with cache_implementation="static" and the language model's forward compiled; the compiled
    forward is set on the instance for this call only, so our loop never runs it."""
    lm = model.model.language_model
    if id(lm) not in _COMPILED:
        _COMPILED[id(lm)] = torch.compile(lm.forward)
    lm.forward = _COMPILED[id(lm)]
    kw = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
    torch.manual_seed(seed)
    try:
        with torch.no_grad():
            return model.generate(
                prompts.gen_ids.repeat_interleave(num_samples, 0),
                attention_mask=prompts.gen_mask.long().repeat_interleave(num_samples, 0),
                generation_mode="image", guidance_scale=JANUS_CFG, cache_implementation="static", **kw,
            )  # fmt: skip
    finally:
        del lm.forward  # back to the class's forward


def outside_share(model, modules, fn) -> float:
    """1 - (wall time inside `modules`' forwards) / (wall time of fn()), nested calls counted once.

    A gvu.rollout.AffineProjection (a head's last Linear that our sampling calls directly, through a packed weight)
    counts as inside: it is the model's own layer."""
    from gvu.rollout import AffineProjection

    inside, depth, t0 = [0.0], [0], [0.0]
    ids = {id(m) for m in modules}

    def counted(m) -> bool:
        return id(m) in ids or isinstance(m, AffineProjection)

    def pre(m, *_):
        if not counted(m):
            return
        if depth[0] == 0:
            t0[0] = time.perf_counter()
        depth[0] += 1

    def post(m, *_):
        if not counted(m):
            return
        depth[0] -= 1
        if depth[0] == 0:
            inside[0] += time.perf_counter() - t0[0]

    from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

    hooks = [register_module_forward_pre_hook(pre), register_module_forward_hook(post)]
    try:
        start = time.perf_counter()
        fn()
        total = time.perf_counter() - start
    finally:
        for h in hooks:
            h.remove()
    return 1.0 - inside[0] / total


def janus_modules(model) -> list:
    m = model.model
    head = m.generation_head  # and its first layers, which our sampling calls without the head's own forward
    return [m.language_model, head, head.proj_out, head.activation_fn, m.generation_embeddings, m.generation_aligner]


def janus_ours_generate(adapter, model, prompts, num_samples: int, greedy: bool, seed: int = 0) -> torch.Tensor:
    s = SamplingConfig(greedy=True, cfg_scale=JANUS_CFG) if greedy else SamplingConfig(cfg_scale=JANUS_CFG)
    return adapter.generate(model, prompts, num_samples, s, generator=torch.Generator().manual_seed(seed))


XOMNI_CFG, XOMNI_MIN_P = 3.0, 0.03  # the released rollout's min-p; CFG on, to measure its second branch


def xomni_hf_generate(adapter, model, prompts, num_samples: int, greedy: bool, seed: int = 0) -> torch.Tensor:
    """XOmniForCausalLM.generate in image mode as the released trainer runs it (mm specials suppressed), CFG through
    transformers' UnbatchedClassifierFreeGuidanceLogitsProcessor (negative prompt = the image prefix: a second
    model call with its own cache per step) -> codes (B*G, H*W)."""
    from transformers import GenerationConfig

    ids, mask = (
        prompts.gen_ids.repeat_interleave(num_samples, 0),
        prompts.gen_mask.long().repeat_interleave(num_samples, 0),
    )
    kw = (
        dict(do_sample=False)
        if greedy
        else dict(do_sample=True, temperature=1.0, min_p=XOMNI_MIN_P, top_k=0, top_p=1.0)
    )
    gc = GenerationConfig(
        max_new_tokens=adapter.image_len, pad_token_id=adapter.pad, guidance_scale=XOMNI_CFG,
        suppress_tokens=[adapter.som, adapter.eom, adapter.image], **kw,
    )  # fmt: skip
    neg = torch.tensor([adapter.uncond_prefix]).expand(ids.shape[0], -1)
    torch.manual_seed(seed)
    model.set_generation_mode("image")
    try:
        with torch.no_grad():
            out = model.generate(inputs=ids, attention_mask=mask, generation_config=gc, negative_prompt_ids=neg)
    finally:
        model.set_generation_mode("text")
    return out[:, ids.shape[1] :] - adapter.offset


def xomni_ours_generate(adapter, model, prompts, num_samples: int, greedy: bool, seed: int = 0) -> torch.Tensor:
    s = (
        SamplingConfig(greedy=True, cfg_scale=XOMNI_CFG)
        if greedy
        else SamplingConfig(min_p=XOMNI_MIN_P, cfg_scale=XOMNI_CFG)
    )
    return adapter.generate(model, prompts, num_samples, s, generator=torch.Generator().manual_seed(seed))


MODELS = {
    # name: (loader, default BxG list, ours, HF baseline, baseline label)
    "toy": (C.load_toy, "1x8,4x8,16x8,16x16", ours_generate, hf_generate, "hf_generate"),
    "janus": (C.load_janus, "1x8,4x8,16x8,16x16", janus_ours_generate, janus_hf_generate, "hf_generate(image,cfg=5)"),
    "xomni": (
        C.load_xomni,
        "1x8,4x8,16x8",
        xomni_ours_generate,
        xomni_hf_generate,
        "hf_generate(image,cfg=3,unbatched)",
    ),
}


def bench_model(name: str, args, info: dict) -> list[dict]:
    """Greedy parity, then interleaved sampled timings, at every BxG for one model -> CSV rows."""
    loader, default_configs, ours, hf, baseline = MODELS[name]
    t_start = time.perf_counter()
    adapter, model, src = loader()
    prompts_all = [m["prompt"] for m in WP.make_prompt_sets(0)[0]]
    rows = []
    for spec in (args.configs or default_configs).split(","):
        B, G = (int(x) for x in spec.lower().split("x"))
        prompts = adapter.tokenize_prompts(prompts_all[:B])
        N = B * G
        # correctness first: greedy decoding must give identical tokens on this very batch
        a = ours(adapter, model, prompts, G, greedy=True)
        b = hf(adapter, model, prompts, G, greedy=True)
        equal = torch.equal(a, b)
        assert equal, f"{name}: greedy tokens differ at B={B} G={G}: {(a != b).sum().item()} of {a.numel()}"
        t = C.time_interleaved(
            {
                "ours": lambda: ours(adapter, model, prompts, G, greedy=False),  # noqa: B023
                "hf_generate": lambda: hf(adapter, model, prompts, G, greedy=False),  # noqa: B023
            },
            warmup=args.warmup,
            repeats=args.repeats,
        )
        load = C.load_average()
        for impl in ("hf_generate", "ours"):
            rows.append(
                {
                    **info,
                    "loadavg": load,
                    "bench": "rollout",
                    "model": src,
                    "B": B,
                    "G": G,
                    "images": N,
                    "impl": impl,
                    "baseline": baseline,
                    "seconds": t[impl],
                    "images_per_s": N / t[impl],
                    "code_tokens_per_s": N * adapter.image_len / t[impl],
                    "speedup_vs_baseline": t["hf_generate"] / t[impl],
                    "greedy_equal": equal,
                    "repeats": args.repeats,
                    "quick": args.quick,
                }
            )
    shapes = C.janus_shapes(adapter, model) if name == "janus" else f"{adapter.image_len} codes/image"
    print(
        f"rollout {name} | {time.perf_counter() - t_start:.0f} s | {info['cpu']} | {info['threads']} threads | "
        f"torch {info['torch']} | transformers {info['transformers']} | {info['git_sha']} | model {src} | "
        f"{shapes} | load {C.load_average()}"
    )
    cols = ["B", "G", "impl", "seconds", "images_per_s", "code_tokens_per_s", "speedup_vs_baseline", "loadavg"]
    print(C.table(rows, cols))
    return rows


def bench_real(args, info: dict) -> list[dict]:
    """--shapes real: Janus-Pro's layout; ours vs (a) HF generate as shipped vs (b) static cache + compiled forward."""
    adapter, model, src = C.load_janus(shapes=args.shapes, device=args.device)
    prompts_all = [m["prompt"] for m in WP.make_prompt_sets(0)[0]]
    cuda = args.device.startswith("cuda")
    impls = {
        "ours": janus_ours_generate,
        "hf_generate": janus_hf_generate,
        "hf_static_compiled": janus_hf_compiled_generate,
    }
    rows = []
    for spec in (args.configs or ("4x8" if args.shapes == "1b" else "1x8,1x16,4x8,4x16,16x8,16x16")).split(","):
        B, G = (int(x) for x in spec.lower().split("x"))
        prompts, N, skipped = adapter.tokenize_prompts(prompts_all[:B], device=args.device), B * G, {}
        ours = janus_ours_generate(adapter, model, prompts, G, greedy=True)
        hf = janus_hf_generate(adapter, model, prompts, G, greedy=True)
        if args.shapes == "real":  # fp32: exact; in bf16 (1b) batch shapes change roundings, so it is recorded
            assert torch.equal(ours, hf), f"janus real: greedy tokens differ at B={B} G={G}: {(ours != hf).sum()}"
        equal = {"ours": f"{(ours == hf).float().mean().item():.4f}", "hf_generate": True}
        try:
            t0 = time.perf_counter()
            equal["hf_static_compiled"] = torch.equal(
                ours, janus_hf_compiled_generate(adapter, model, prompts, G, True)
            )
            print(f"compiled baseline: first (compiling) run {time.perf_counter() - t0:.1f} s")
        except Exception as e:  # noqa: BLE001 -- any failure of torch.compile on this machine is reported, not hidden
            skipped["hf_static_compiled"] = f"skipped: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        run_fns = {
            k: (lambda f=f, p=prompts, g=G: f(adapter, model, p, g, greedy=False))
            for k, f in impls.items()
            if k not in skipped
        }
        t = C.time_interleaved(run_fns, warmup=args.warmup, repeats=args.repeats)
        # forward hooks time host-side launches only on CUDA (the work is asynchronous): CPU only
        hooked = () if cuda else ("ours", "hf_generate")
        share = {k: outside_share(model, janus_modules(model), run_fns[k]) for k in hooked}
        load = C.load_average()
        for impl in impls:
            sec = t.get(impl, float("nan"))
            rows.append({
                **info, "loadavg": load, "bench": "rollout", "model": src, "B": B, "G": G, "images": N, "impl": impl,
                "baseline": "hf_generate(image,cfg=5)", "seconds": sec, "images_per_s": N / sec,
                "code_tokens_per_s": N * adapter.image_len / sec, "speedup_vs_baseline": t["hf_generate"] / sec,
                "speedup_vs_compiled": t["hf_static_compiled"] / sec if "hf_static_compiled" in t else float("nan"),
                "outside_share": share.get(impl, float("nan")), "greedy_equal": equal.get(impl, ""),
                "note": skipped.get(impl, ""), "shapes": args.shapes, "device": args.device, "repeats": args.repeats,
                "quick": args.quick,
            })  # fmt: skip
    print(
        f"rollout janus --shapes {args.shapes} --device {args.device} | {info['cpu']} | {info['cuda']} | "
        f"{info['threads']} threads | torch {info['torch']} | "
        f"transformers {info['transformers']} | {info['git_sha']} | {C.janus_shapes(adapter, model)} | "
        f"load {C.load_average()}"
    )
    cols = ["B", "G", "impl", "seconds", "images_per_s", "speedup_vs_baseline", "speedup_vs_compiled", "outside_share"]
    print(C.table(rows, [*cols, "note", "loadavg"]))
    return rows


def profile_real(args) -> None:
    """--profile: where our rollout's time goes at Janus-Pro's layout, per op and input shape (torch.profiler), for
    the first --configs entry: sampling (the timed path: CFG on the head's last Linear, its packed GEMM) and greedy
    (logit-space CFG, the head through F.linear on both branches: what sampling did before HeadParts)."""
    from torch.profiler import ProfilerActivity, profile

    adapter, model, _ = C.load_janus(shapes=args.shapes, device=args.device)
    B, G = (int(x) for x in (args.configs or "1x8").split(",")[0].lower().split("x"))
    prompts = adapter.tokenize_prompts([m["prompt"] for m in WP.make_prompt_sets(0)[0]][:B], device=args.device)
    steps = adapter.image_len
    for greedy in (False, True):
        janus_ours_generate(adapter, model, prompts, G, greedy)  # warm
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            janus_ours_generate(adapter, model, prompts, G, greedy)
        total = sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e3
        print(f"\n{'greedy' if greedy else 'sampling'} {B}x{G}: {total:.0f} ms of ops, {total / steps:.2f} ms a step; "
              "the top ops by self time, ms a step:")  # fmt: skip
        top = sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_time_total)[:6]
        for e in top:
            print(f"  {e.self_cpu_time_total / 1e3 / steps:6.2f}  {e.key:45s} {str(e.input_shapes)[:70]}")


def run(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one tiny shape (2x2), 1 repeat: the smoke test")
    p.add_argument("--model", choices=[*MODELS, "all"], default="all", help="which UMM(s) to measure")
    p.add_argument("--configs", default=None, help="comma list of BxG (prompts x samples); default: per model")
    p.add_argument(
        "--shapes",
        choices=["tiny", "real", "1b"],
        default="tiny",
        help="real: Janus-Pro's layout, small body; 1b: Janus-Pro-1B's shapes (bf16; for a GPU)",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (--shapes real / 1b)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per implementation (median reported)")
    # the greedy check before each config's timing already runs both paths once, so no extra warmup by default
    p.add_argument("--warmup", type=int, default=0, help="extra untimed runs per implementation before timing")
    # 1 by default: this model is too small for intra-op parallelism, and with a second busy job on the 2 cores a
    # 2-thread run waits at every barrier (16x8 rollout: 0.60 s at 1 thread vs 11.2 s at 2, load ~5)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: leave torch's default)")
    p.add_argument("--out", default=None, help="CSV path (default bench/results/rollout.csv)")
    p.add_argument("--profile", action="store_true", help="--shapes real: per-op times of ours, no timing rows")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.configs, args.repeats, args.warmup = "2x2", 1, 0

    if args.profile:
        if args.shapes == "tiny":
            p.error("--profile profiles Janus-Pro's layout: add --shapes real (or 1b)")
        profile_real(args)
        return []
    info = C.machine_info()
    rows = bench_real(args, info) if args.shapes != "tiny" else []
    for name in () if args.shapes != "tiny" else tuple(MODELS) if args.model == "all" else (args.model,):
        rows += bench_model(name, args, info)
    path = C.append_csv("rollout", rows, args.out)
    print(f"appended {len(rows)} rows to {path}")
    return rows


if __name__ == "__main__":
    run()
