"""The Janus-Pro adapter on a tiny random Janus checkpoint (no download): rollout == HF generate, image log-probs
vs a full-logits recomputation, batch-independent prompt log-probs, LoRA placement and gradients, training runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gvu.config import load_config
from gvu.models import load_umm
from gvu.models.janus import JanusUMM
from gvu.rollout import SamplingConfig
from gvu.testing import make_tiny_janus

REPO = Path(__file__).resolve().parents[2]
WORDS = "a an photo of red blue green yellow dog cat car cup two three four and left right above below the".split()
PROMPTS = ["a photo of a red dog", "two cats", "a blue cup left of a green car above the dog"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = make_tiny_janus(str(tmp_path_factory.mktemp("janus") / "ckpt"), WORDS, seed=0)
    adapter, model = JanusUMM.from_pretrained(path)
    return path, adapter, model


def hf_reference_logprobs(model, adapter, prompts, codes, cfg_scale, temperature):
    """Full-logits recomputation with HF's own modules and position convention: the whole generation head on both
    branches, CFG on the (N, L, K) logits, log_softmax(z / T) -> (N, L, K) fp64."""
    lm = model
    ids, mask = adapter._cfg_rows(prompts.gen_ids, prompts.gen_mask, cfg_scale > 1)
    rows = torch.cat([codes, codes]) if cfg_scale > 1 else codes
    emb = torch.cat([lm.get_input_embeddings()(ids), lm.prepare_embeddings_for_image_generation(rows)], 1)
    mask = torch.cat([mask, torch.ones_like(rows)], 1)
    h = lm.model.language_model(inputs_embeds=emb, attention_mask=mask).last_hidden_state
    z = lm.model.generation_head(h[:, ids.shape[1] - 1 : -1]).double()
    n = codes.shape[0]
    if cfg_scale > 1:
        z = z[n:] + cfg_scale * (z[:n] - z[n:])
    return torch.log_softmax(z / temperature, -1)


# ----------------------------------------------------------------------------------------------- rollout


def test_greedy_cfg_rollout_equals_hf_generate(tiny):
    _, adapter, model = tiny
    prompts = adapter.tokenize_prompts(PROMPTS)
    assert prompts.gen_mask.sum(1).unique().numel() == 3, "prompts of different lengths exercise left padding"
    G, scale = 2, 5.0
    ours = adapter.generate(model, prompts, G, SamplingConfig(greedy=True, cfg_scale=scale))
    # HF refuses num_return_sequences > 1 when greedy, so it gets each prompt G times
    hf = model.generate(
        prompts.gen_ids.repeat_interleave(G, 0),
        attention_mask=prompts.gen_mask.long().repeat_interleave(G, 0),
        generation_mode="image",
        do_sample=False,
        guidance_scale=scale,
    )
    assert ours.shape == (len(PROMPTS) * G, adapter.image_len) and ours.dtype == torch.long
    assert torch.equal(ours, hf)
    assert int(ours.max()) < adapter.num_codes
    adapter.max_rows = 4  # chunks of 2 conditional + 2 unconditional rows
    try:
        assert torch.equal(adapter.generate(model, prompts, G, SamplingConfig(greedy=True, cfg_scale=scale)), hf)
    finally:
        adapter.max_rows = 0


def test_sampling_is_seeded_and_filters_apply(tiny):
    _, adapter, model = tiny
    prompts = adapter.tokenize_prompts(PROMPTS[:2])
    s = SamplingConfig(temperature=1.0, top_k=3, cfg_scale=3.0)
    a = adapter.generate(model, prompts, 3, s, generator=torch.Generator().manual_seed(1))
    b = adapter.generate(model, prompts, 3, s, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == (6, adapter.image_len)
    # top-k 3 of the CFG-combined logits: every sampled code is among the 3 best under teacher forcing
    full = hf_reference_logprobs(model, adapter, prompts.repeat_interleave(3), a, 3.0, 1.0)
    rank = (full > full.gather(-1, a[..., None])).sum(-1)
    assert int(rank.max()) < 3


def test_the_split_generation_head_is_the_head(tiny):
    """The sampling path's head (features before vision_head, then its packed projection) == generation_head."""
    _, adapter, model = tiny
    head = model.model.generation_head
    h = torch.randn(5, head.proj_out.in_features)
    parts = adapter._head_parts(head)
    with torch.no_grad():
        torch.testing.assert_close(parts.project(parts.features(h)), head(h))


# ----------------------------------------------------------------------------------------------- scoring


@pytest.mark.parametrize("cfg_scale,temperature", [(5.0, 1.0), (1.0, 0.7), (2.5, 1.3)])
def test_image_logprobs_equal_full_logits_recomputation(tiny, cfg_scale, temperature):
    _, adapter, model = tiny
    prompts = adapter.tokenize_prompts(PROMPTS)
    codes = torch.randint(0, adapter.num_codes, (len(PROMPTS) * 2, adapter.image_len))
    lp = adapter.image_logprobs(model, prompts, codes, temperature=temperature, cfg_scale=cfg_scale)
    ref = hf_reference_logprobs(model, adapter, prompts.repeat_interleave(2), codes, cfg_scale, temperature)
    ref = ref.gather(-1, codes[..., None])[..., 0]
    assert lp.shape == codes.shape and lp.dtype == torch.float32
    assert torch.allclose(lp.double(), ref, atol=1e-4), (lp.double() - ref).abs().max()
    adapter.max_rows = 3
    try:
        chunked = adapter.image_logprobs(model, prompts, codes, temperature=temperature, cfg_scale=cfg_scale)
    finally:
        adapter.max_rows = 0
    assert torch.allclose(chunked, lp, atol=1e-5)


def test_prompt_logprobs_row_alone_equals_padded_batch_and_hf_forward(tiny):
    _, adapter, model = tiny
    prompts = adapter.tokenize_prompts(PROMPTS)
    with torch.no_grad():
        images = adapter.decode(adapter.generate(model, prompts, 1, SamplingConfig(cfg_scale=4.0)))
        logp, mask = adapter.prompt_logprobs(model, images, prompts)
    assert images.dtype == np.uint8 and images.shape == (3, 32, 32, 3)
    assert logp.shape == mask.shape == prompts.ids.shape and torch.equal(mask, prompts.mask)
    assert (logp[~mask] == 0).all() and (logp[mask] < 0).all()
    for i in range(len(PROMPTS)):
        one = adapter.tokenize_prompts([PROMPTS[i]])
        with torch.no_grad():
            alone, m1 = adapter.prompt_logprobs(model, images[i : i + 1], one)
        assert torch.allclose(alone[m1], logp[i][mask[i]], atol=1e-5)
        # HF's own understanding path: placeholder tokens in input_ids + pixel_values, full-vocab lm_head
        ids = adapter._und_head + [adapter.image_token] * adapter.und_len + adapter._und_tail + one.ids[0].tolist()
        pix = adapter.pixel_values(images[i : i + 1], "cpu", torch.float32)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids]), pixel_values=pix).logits[0].double()
        k = one.ids.shape[1]
        ref = torch.log_softmax(logits[-k - 1 : -1], -1).gather(-1, one.ids[0, :, None])[:, 0]
        assert torch.allclose(alone[0].double(), ref, atol=1e-4)


def test_pixel_values_match_the_janus_image_processor(tiny):
    from transformers.models.janus.image_processing_pil_janus import JanusImageProcessorPil

    _, adapter, _ = tiny
    proc = JanusImageProcessorPil(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    rng = np.random.default_rng(0)
    square = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    ours = adapter.pixel_values(square, "cpu", torch.float32)
    hf = proc(images=list(square), return_tensors="pt")["pixel_values"]
    assert torch.allclose(ours, hf, atol=1e-6)
    wide = rng.integers(0, 256, (1, 20, 48, 3), dtype=np.uint8)  # resize + pad: PIL vs torch bicubic differ a bit
    ours = adapter.pixel_values(wide, "cpu", torch.float32)
    hf = proc(images=list(wide), return_tensors="pt")["pixel_values"]
    assert ours.shape == hf.shape == (1, 3, 32, 32)
    assert (ours - hf).abs().mean() < 0.05 and torch.allclose(ours[..., :2, :], hf[..., :2, :], atol=1e-6)  # pad rows


# ----------------------------------------------------------------------------------------------- LoRA


def lora_model(adapter, model, **kw):
    import copy

    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=adapter.lora_targets(load_config().lora.target_modules), **kw)
    return get_peft_model(copy.deepcopy(model), cfg)


def test_lora_targets_the_language_model_only_and_gradients_reach_it(tiny):
    _, adapter, model = tiny
    peft_model = lora_model(adapter, model)
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert names and all("language_model.layers" in n and "lora_" in n for n in names)
    layers = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in names}
    assert layers == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not any("vision_model" in n or "vqmodel" in n for n in names)
    prompts = adapter.tokenize_prompts(PROMPTS[:2])
    codes = torch.randint(0, adapter.num_codes, (4, adapter.image_len))

    def grads(m):
        m.zero_grad()
        adapter.image_logprobs(m, prompts, codes, cfg_scale=5.0).sum().backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}

    g = grads(peft_model)
    # B starts at 0, so only the B matrices get a gradient at initialisation
    assert all(g[n].abs().sum() > 0 for n in names if "lora_B" in n)
    peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_model.train()
    g2 = grads(peft_model)
    assert all(torch.allclose(g[n], g2[n], atol=1e-6) for n in names)


# ----------------------------------------------------------------------------------------------- loading, training


def test_load_umm_janus_branch_and_errors(tiny, tmp_path):
    from gvu.config import ConfigError

    path, _, _ = tiny
    cfg = load_config(None, ["--model.backend=janus", f"--model.path={path}", "--model.max_rows=6"])
    adapter, model = load_umm(cfg.model)
    assert isinstance(adapter, JanusUMM) and adapter.max_rows == 6
    assert adapter.instruction == "Describe the image in detail."
    with pytest.raises(ConfigError, match="local hub cache"):
        load_umm(load_config(None, ["--model.backend=janus", "--model.path=nobody/not-a-cached-model"]).model)
    with pytest.warns(UserWarning, match="flash-attn is not installed"):
        from gvu.models import attn_implementation

        assert attn_implementation("flash_attention_2") == "sdpa"


def write_run_files(tmp_path, ckpt, zero, checkpointing=False):
    ds = json.loads((REPO / "configs" / f"ds_zero{zero}.json").read_text())
    if zero == 3:  # partition every parameter of the tiny model (the shipped threshold would keep them all whole)
        ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"tag": "t", "prompt": p}) + "\n" for p in PROMPTS + ["a yellow cat"]))
    cfg = tmp_path / "janus_tiny.yaml"
    cfg.write_text(
        f"model: {{backend: janus, path: {ckpt}, max_rows: 8, gradient_checkpointing: {str(checkpointing).lower()}}}\n"
        f"data: {{prompts: {prompts}}}\n"
        "sampling: {cfg_scale: 3.0, temperature: 1.0}\n"
        "lora: {r: 4, alpha: 8}\n"
        "grpo: {prompts_per_step: 2, group_size: 2, beta: 0.04}\n"
        "optim: {lr: 1.0e-2, warmup_steps: 0}\n"
        f"train: {{steps: 2, deepspeed: {tmp_path / 'ds.json'}, eval_before: false, eval_after: false, "
        "save_every: 2, log_every: 1, sample_grid_prompts: 0}\n"
    )
    return cfg


def run(cmd, cwd):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def check_run(out):
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(np.isfinite(r["loss"]) and 0 < r["reward/mean"] < 1 for r in rows)
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert "language_model" in str(cfg["target_modules"])


def test_two_training_steps_in_process_zero2_move_every_lora_parameter(tiny, tmp_path):
    """The short version of the run below: train_step twice on one rank, in this process."""
    from gvu import engine as E
    from gvu import train
    from gvu.data import PromptSampler, load_prompt_sets
    from gvu.metrics import PhaseTimer

    path, _, _ = tiny
    cfg = load_config(write_run_files(tmp_path, path, 2), [f"--train.output_dir={tmp_path / 'run'}"])
    rank, world = E.init_distributed()
    adapter, model = E.build(cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    engine = E.make_engine(model, cfg, world)
    sampler = PromptSampler(load_prompt_sets(cfg.data)[0], cfg.grpo.prompts_per_step, 0, rank, world)
    for step in range(2):
        m, _ = train.train_step(engine, adapter, sampler.batch(step), cfg, step, rank, PhaseTimer())
        assert np.isfinite(m["loss"]) and 0 < m["reward/mean"] < 1 and m["reward/group_std"] > 0
    after = dict(engine.module.named_parameters())
    unchanged = [n for n in before if torch.equal(before[n], after[n].detach())]
    assert before and not unchanged, f"LoRA parameters that did not move: {unchanged}"


@pytest.mark.slow
def test_two_training_steps_two_cpu_ranks_zero3(tiny, tmp_path):
    path, _, _ = tiny
    cfg = write_run_files(tmp_path, path, 3, checkpointing=True)
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", "29517"]
    run(cmd + [str(REPO / "gvu" / "train.py"), str(cfg), f"--train.output_dir={tmp_path / 'run'}"], REPO)
    check_run(tmp_path / "run")


@pytest.mark.parametrize("name,stage", [("janus_pro_1b", 2), ("janus_pro_7b", 3)])
def test_shipped_gpu_configs_parse(name, stage):
    cfg = load_config(f"configs/{name}.yaml")
    assert cfg.model.backend == "janus" and cfg.model.dtype == "bfloat16"
    assert cfg.model.attn_implementation == "flash_attention_2" and cfg.grpo.logprob_mode == "rollout"
    assert json.loads((REPO / cfg.train.deepspeed).read_text())["zero_optimization"]["stage"] == stage


def test_decode_then_encode_shapes(tiny):
    _, adapter, _ = tiny
    codes = torch.randint(0, adapter.num_codes, (2, adapter.image_len))
    images = adapter.decode(codes)
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8
    back = adapter.encode(images)
    assert back.shape == codes.shape and int(back.max()) < adapter.num_codes


def test_real_layout_config_has_janus_pro_image_layout():
    """The benchmark's random Janus (bench --shapes real): Janus-Pro's 24 x 24 grid of 16384 codes at 384 px and
    SigLIP at 384 / 16, so rollout runs 576 steps and understanding reads 576 placeholders; the body is small."""
    from gvu.testing import real_layout_janus_config

    cfg = real_layout_janus_config(vocab_size=64, image_token_id=3)
    v, q, t = cfg.vision_config, cfg.vq_config, cfg.text_config
    assert (q.num_patches**2, q.num_embeddings, v.num_image_tokens) == (576, 16384, 576)
    assert (v.image_size, v.patch_size, len(q.channel_multiplier)) == (384, 16, 5)  # 384 / 2^4 = 24 latents a side
    assert (t.hidden_size, t.num_hidden_layers) == (256, 2)
