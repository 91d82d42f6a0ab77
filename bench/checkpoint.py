"""Checkpoint size and save time: the whole model (DeepSpeed's default, "before") vs what trains (ours, "after").

    python bench/checkpoint.py                    # the shipped toy UMM and a random Janus-Pro-1B-shape model (bf16)
    python bench/checkpoint.py --model toy        # the toy alone (seconds)
    python bench/checkpoint.py --quick            # a tiny random Janus instead of the 1B shapes (the smoke test)

Each model gets the trainer's policy (LoRA r16 on q/k/v/o/gate/up/down, gvu.engine.build_policy) inside a one-rank
ZeRO-2 DeepSpeed engine, one optimizer step so the Adam state exists, then gvu.checkpoint.save_checkpoint's
DeepSpeed call with exclude_frozen_parameters False (before) and True (after), interleaved, median of --repeats.
Size = bytes of the step folder; the adapter folder is reported apart (the same in both).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]
import _common as C  # noqa: E402
import torch  # noqa: E402


def janus_1b_config():
    """JanusConfig at Janus-Pro-1B's published shapes: Llama d=2048 x 24 layers, FFN 5632, vocab 102400; SigLIP-L/16
    at 384 px; the VQ with 16384 codes projected to 2048."""
    from transformers import JanusConfig, LlamaConfig

    text = LlamaConfig(
        vocab_size=102400, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16,
        num_key_value_heads=16, max_position_embeddings=16384, tie_word_embeddings=False,
    )  # fmt: skip
    vq = dict(num_embeddings=16384, projection_dim=2048, image_token_embed_dim=2048)
    return JanusConfig(text_config=text.to_dict(), vq_config=vq, image_token_id=100581, tie_word_embeddings=False)


def build(name: str, quick: bool, tmp: Path):
    """(engine, label, parameter count) for a one-rank ZeRO-2 engine after one optimizer step."""
    from gvu import engine as E
    from gvu.config import load_config

    if name == "toy":
        cfg = load_config(C.REPO / "configs" / "toy.yaml", [f"--train.output_dir={tmp}/run"])
        backend, model = E.build(cfg)
        label = "toy_umm (shipped, fp32, + factorised image-head update)"
    else:
        from transformers import JanusForConditionalGeneration

        from gvu.testing import tiny_janus_config, tiny_janus_tokenizer

        cfg = load_config(None, ["--model.backend=janus", "--model.dtype=bfloat16", f"--train.output_dir={tmp}/r"])
        if quick:
            tok = tiny_janus_tokenizer(["a", "red", "dog"])
            jcfg, label = tiny_janus_config(len(tok), tok.convert_tokens_to_ids("<image_placeholder>")), "janus tiny"
        else:
            jcfg, label = janus_1b_config(), "random Janus-Pro-1B shapes (bf16)"
        model = JanusForConditionalGeneration(jcfg).to(torch.bfloat16)
        from gvu.models.janus import JanusUMM

        backend = JanusUMM.__new__(JanusUMM)  # only lora_targets is used: no tokenizer needed
        model = E.build_policy(cfg, backend, model)
    engine = E.make_engine(model, cfg, 1)
    trainable = [p for p in engine.module.parameters() if p.requires_grad]
    loss = sum((p.float() ** 2).sum() for p in trainable)  # any loss: one step makes Adam's state exist
    engine.backward(loss)
    engine.step()
    return engine, label, sum(p.numel() for p in engine.module.parameters()), sum(p.numel() for p in trainable)


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def bench(name: str, args, info: dict) -> list[dict]:
    tmp = Path(tempfile.mkdtemp(prefix="gvu_bench_ckpt_"))
    try:
        engine, label, n_all, n_trained = build(name, args.quick, tmp)
        sizes, times = {}, {"before": [], "after": []}
        for r in range(args.repeats):
            for impl, exclude in (("before", False), ("after", True)):
                out = tmp / f"{impl}{r}"
                t0 = time.perf_counter()
                engine.save_checkpoint(str(out), tag="step1", save_latest=False, exclude_frozen_parameters=exclude)
                times[impl].append(time.perf_counter() - t0)
                sizes[impl] = folder_bytes(out / "step1")
                shutil.rmtree(out)
        from gvu.checkpoint import save_adapter

        t0 = time.perf_counter()
        save_adapter(engine.module, tmp / "adapter", 1, True)
        adapter_s, adapter_b = time.perf_counter() - t0, folder_bytes(tmp / "adapter")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = []
    for impl in ("before", "after"):
        med = sorted(times[impl])[len(times[impl]) // 2]
        rows.append({
            **info, "bench": "checkpoint", "model": label, "impl": impl, "params": n_all, "trained_params": n_trained,
            "checkpoint_MiB": sizes[impl] / 2**20, "save_s": med, "adapter_MiB": adapter_b / 2**20,
            "adapter_save_s": adapter_s, "size_vs_after": sizes[impl] / sizes["after"],
            "time_vs_after": med / max(sorted(times["after"])[len(times["after"]) // 2], 1e-9), "repeats": args.repeats,
        })  # fmt: skip
    return rows


def run(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["toy", "janus", "all"], default="all")
    p.add_argument("--quick", action="store_true", help="tiny Janus instead of the 1B shapes, 1 repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None, help="CSV path (default bench/results/checkpoint.csv)")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats = 1
    from gvu import engine as E

    E.init_distributed()
    info = C.machine_info()
    rows = []
    for name in ("toy", "janus") if args.model == "all" else (args.model,):
        rows += bench(name, args, info)
    cols = ["model", "impl", "params", "trained_params", "checkpoint_MiB", "save_s", "size_vs_after", "time_vs_after"]
    print(C.table(rows, cols))
    print(f"appended {len(rows)} rows to {C.append_csv('checkpoint', rows, args.out)}")
    return rows


if __name__ == "__main__":
    run()
