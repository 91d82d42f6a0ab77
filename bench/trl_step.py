"""Step time of a tiny TRL GRPOTrainer on CPU, TRL's own log-probs vs `kernels.integrations.trl.patch_trl_grpo()`.

    python bench/trl_step.py                 # Llama d=256 x 2 layers, vocab 32000, 8 x 64-token completions
    python bench/trl_step.py --vocab 151936  # a Qwen-sized vocabulary (the LM head dominates more)
    python bench/trl_step.py --quick         # tiny model, a few steps (tests/bench/test_bench_quick.py)

One trainer, one training run: a callback patches or unpatches TRL before every step in the order A B B A (A =
patched), so both arms share the model, the optimizer state's evolution and the machine's load; the first
`--warmup` steps are not counted. The whole step is timed (generation, reward, log-probs, loss, backward, Adam):
the ratio is what a user sees, and it is < the kernel's own speedup by the share of the step spent outside the LM
head. Writes one row to bench/results/trl_step.csv: medians of both arms, the ratio (TRL's median / patched
median: > 1 means the patch is faster), machine info with the CPU's bf16 flags, the load average.
The model and its WordLevel tokenizer are built here (random weights, nothing downloaded), like
tests/kernels/test_integrations_trl.py.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

from _common import append_csv, cpu_flags, machine_info  # noqa: E402

ARMS = ("patched", "trl")


def tokenizer(vocab: int):
    """A WordLevel tokenizer over <pad>, <eos>, <unk>, w0 ... w{vocab - 4}: every model id decodes to a word."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(vocab - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def arm_of(step: int, warmup: int) -> str:
    """A B B A A B B A ... after `warmup` alternating steps (A = patched)."""
    if step < warmup:
        return ARMS[step % 2]
    return ARMS[(step - warmup) % 4 in (1, 2)]


def run(args) -> dict:
    """Train `warmup + steps` GRPO steps, toggling the patch per step; {arm: [seconds of each counted step]}."""
    import torch
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM, PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from kernels.integrations import trl as gvu_trl

    times: dict[str, list[float]] = {a: [] for a in ARMS}

    class Toggle(TrainerCallback):
        def on_step_begin(self, _args, state, control, **kw):
            self.arm = arm_of(state.global_step, args.warmup)
            (gvu_trl.patch_trl_grpo if self.arm == "patched" else gvu_trl.unpatch_trl_grpo)()
            self.t0 = time.perf_counter()

        def on_step_end(self, _args, state, control, **kw):
            if state.global_step > args.warmup:  # global_step already counts this step
                times[self.arm].append(time.perf_counter() - self.t0)

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=256, pad_token_id=0, eos_token_id=1, bos_token_id=1)  # fmt: skip
    model = LlamaForCausalLM(cfg).to(getattr(torch, args.dtype))
    prompts = Dataset.from_dict({"prompt": [f"w{i} w{i + 1} w{i + 2}" for i in range(64)]})

    def reward(completions, **kw):  # a spread within every group, so the advantages are not all zero
        return [float(c.count("w1")) + 0.01 * len(c) for c in completions]

    before = gvu_trl.stats()
    with tempfile.TemporaryDirectory(prefix="gvu_trl_step_") as out:
        gargs = GRPOConfig(output_dir=out, per_device_train_batch_size=args.batch, num_generations=args.batch,
                           max_completion_length=args.completion, max_steps=args.warmup + args.steps,
                           learning_rate=1e-5, logging_steps=10**6, report_to="none", use_cpu=True, seed=0,
                           save_strategy="no", bf16=False, disable_tqdm=True)  # fmt: skip
        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=gargs, train_dataset=prompts,
                              processing_class=tokenizer(args.vocab), callbacks=[Toggle()])  # fmt: skip
        trainer.remove_callback(PrinterCallback)  # no per-run metrics dump in the bench output
        try:
            trainer.train()
        finally:
            gvu_trl.unpatch_trl_grpo()
    served = gvu_trl.stats()["calls"] - before["calls"]
    if served == 0:
        raise RuntimeError("the patched steps never reached kernels.linear_token_logprobs")
    return {"times": times, "served": served}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, 2 + 4 steps (CI smoke test)")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8, help="completions per step (one prompt's group)")
    ap.add_argument("--completion", type=int, default=64, help="max completion tokens")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="model parameters' dtype")
    ap.add_argument("--steps", type=int, default=12, help="counted steps (a multiple of 4 balances A B B A)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--csv", default=os.path.join(HERE, "results", "trl_step.csv"))
    args = ap.parse_args(argv)
    if args.quick:
        args.vocab, args.hidden, args.layers, args.batch, args.completion, args.steps = 64, 32, 1, 4, 8, 4
    info = dict(machine_info(), **cpu_flags())
    t0 = time.time()
    res = run(args)
    med = {a: statistics.median(v) for a, v in res["times"].items()}
    row = dict(info, quick=args.quick, vocab=args.vocab, hidden=args.hidden, layers=args.layers, batch=args.batch,
               completion=args.completion, dtype=args.dtype, steps=args.steps, warmup=args.warmup,
               patched_s=round(med["patched"], 4), trl_s=round(med["trl"], 4),
               ratio=round(med["trl"] / med["patched"], 3), kernel_calls=res["served"],
               patched_all=" ".join(f"{x:.3f}" for x in res["times"]["patched"]),
               trl_all=" ".join(f"{x:.3f}" for x in res["times"]["trl"]),
               loadavg_end=machine_info()["loadavg"])  # fmt: skip
    append_csv("trl_step", [row], path=args.csv)
    print(f"# {info['cpu']} ({info['bf16_flags'] or 'no native bf16'}), torch {info['torch']}, load {info['loadavg']} "
          f"-> {row['loadavg_end']}, git {info['git_sha']}")  # fmt: skip
    print(f"GRPO step, vocab {args.vocab}, d={args.hidden} x {args.layers}, {args.batch} x {args.completion} tokens, "
          f"{args.dtype}: TRL {med['trl']:.3f} s, patched {med['patched']:.3f} s (medians of {args.steps // 2} each) "
          f"-> ratio {row['ratio']:.3f}x; {time.time() - t0:.0f} s, row in {os.path.relpath(args.csv)}")  # fmt: skip
    return row


if __name__ == "__main__":
    main()
