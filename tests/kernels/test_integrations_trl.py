"""kernels.integrations.trl: a tiny TRL GRPO training on CPU, patched and unpatched, takes the same steps.

The model (Llama, d=32, 1 layer, 48-word vocabulary) and its WordLevel tokenizer are built here; nothing is downloaded.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("datasets")

from kernels.integrations import trl as gvu_trl  # noqa: E402

WORDS = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(45)]


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def _train(out_dir, steps=3):
    """(per-step logs, final parameters, initial parameters) of a seeded 3-step GRPO run."""
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                      eos_token_id=1, bos_token_id=1)  # fmt: skip
    model = LlamaForCausalLM(cfg)
    init = {k: v.detach().clone() for k, v in model.named_parameters()}
    prompts = Dataset.from_dict({"prompt": [f"w{i} w{i + 1} w{i + 2}" for i in range(8)]})

    def reward(completions, **kw):  # a spread within every group, so the advantages are not all zero
        return [float(c.count("w1")) + 0.1 * len(c) for c in completions]

    args = GRPOConfig(output_dir=str(out_dir), per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=6, max_steps=steps, learning_rate=1e-2, logging_steps=1, report_to="none",
                      use_cpu=True, seed=0, save_strategy="no", bf16=False)  # fmt: skip
    trainer = GRPOTrainer(
        model=model, reward_funcs=reward, args=args, train_dataset=prompts, processing_class=_tokenizer()
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return logs, {k: v.detach().clone() for k, v in model.named_parameters()}, init


def test_patched_trl_grpo_takes_the_same_steps(tmp_path):
    ref_logs, ref_params, init = _train(tmp_path / "trl")
    before = gvu_trl.stats()
    gvu_trl.patch_trl_grpo()
    try:
        logs, params, _ = _train(tmp_path / "gvu")
    finally:
        gvu_trl.unpatch_trl_grpo()
    served = gvu_trl.stats()["calls"] - before["calls"]
    assert served >= 3 and gvu_trl.stats()["fallbacks"] == before["fallbacks"], gvu_trl.stats()  # ours ran each step
    assert len(logs) == len(ref_logs) == 3
    for a, b in zip(logs, ref_logs, strict=True):
        for key in ("loss", "grad_norm", "entropy"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (key, a[key], b[key])
    # Every parameter moved, and the same way with and without the patch: Adam (lr 1e-2) turns last-bit gradient
    # differences of near-zero entries into up to ~2e-6 (measured), against updates of ~1e-2 per step.
    for name, p in params.items():
        update = (ref_params[name] - init[name]).norm()
        assert update > 0 and not torch.equal(p, init[name]), name
        assert (p - ref_params[name]).norm() <= 1e-3 * update, name
        torch.testing.assert_close(p, ref_params[name], rtol=1e-3, atol=1e-5)
