"""The X-Omni backend on the tiny fixture model (tests/fixtures/xomni_tiny, made by the released code) with the tiny
offline tokenizer: rollout == the port's generate (and its CFG processor), image log-probs vs full logits, the
token reward batch-independent and equal to a plain forward, the code rendering, LoRA placement, training runs."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import GenerationConfig

from gvu.config import ConfigError, load_config
from gvu.models import backend_class, contract_problems, load_umm
from gvu.models.xomni.backend import XOmniUMM
from gvu.models.xomni.codes import read_codes, render_codes
from gvu.models.xomni.modeling import position_ids_from_mask
from gvu.models.xomni.options import folder_problems
from gvu.rollout import SamplingConfig
from gvu.testing import make_tiny_xomni

REPO = Path(__file__).resolve().parents[2]
PROMPTS = ["a photo of a red dog", "two cats", "a blue cup left of a green car above the dog"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: these models are too small for intra-op parallelism, and on the shared cores a second
    thread mostly waits at barriers (bench/rollout.py's note: 0.60 s at 1 thread vs 11.2 s at 2 under load)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = make_tiny_xomni(str(tmp_path_factory.mktemp("xomni") / "ckpt"))
    backend, model = XOmniUMM.from_pretrained(path)
    return path, backend, model


@pytest.fixture
def chunked(tiny):
    """Set backend.max_rows for one test, restored afterwards."""
    backend = tiny[1]
    yield lambda k: setattr(backend, "max_rows", k)
    backend.max_rows = 0


def port_generate(backend, model, prompts, G, cfg_scale=1.0):
    """XOmniForCausalLM.generate in image mode as the released trainer calls it (greedy, max_new_tokens = H*W,
    mm specials suppressed, negative_prompt_ids = the image prefix for CFG) -> codes (B*G, H*W)."""
    ids, mask = prompts.gen_ids.repeat_interleave(G, 0), prompts.gen_mask.long().repeat_interleave(G, 0)
    gc = GenerationConfig(
        max_new_tokens=backend.image_len, do_sample=False, pad_token_id=backend.pad,
        suppress_tokens=[backend.som, backend.eom, backend.image], guidance_scale=cfg_scale,
    )  # fmt: skip
    neg = torch.tensor([backend.uncond_prefix]).expand(ids.shape[0], -1) if cfg_scale > 1 else None
    model.set_generation_mode("image")
    try:
        out = model.generate(inputs=ids, attention_mask=mask, generation_config=gc, negative_prompt_ids=neg)
    finally:
        model.set_generation_mode("text")
    return out[:, ids.shape[1] :] - backend.offset


def full_image_logprobs(backend, model, prompts, codes, cfg_scale, temperature):
    """Released-style recomputation: model(...).logits in image mode (full width) for both branches, CFG on the
    log-softmaxes as transformers' processor does, log_softmax(. / T) over the codes -> (N, L, K) fp64."""
    ids, mask = backend._cfg_rows(prompts.gen_ids, prompts.gen_mask, cfg_scale > 1)
    rows = torch.cat([codes, codes]) if cfg_scale > 1 else codes
    seq = torch.cat([ids, rows + backend.offset], 1)
    mask = torch.cat([mask, torch.ones_like(rows)], 1)
    model.set_generation_mode("image")
    try:
        with torch.no_grad():
            z = model(input_ids=seq, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    finally:
        model.set_generation_mode("text")
    z = z[:, ids.shape[1] - 1 : -1].double().log_softmax(-1)
    n = codes.shape[0]
    if cfg_scale > 1:
        z = z[n:] + cfg_scale * (z[:n] - z[n:])
    k = slice(backend.offset, backend.offset + backend.num_codes)
    return torch.log_softmax(z[..., k] / temperature, -1)


# ----------------------------------------------------------------------------------------------- rollout


def test_contract_and_tokenizer_ids_match_the_fixture(tiny):
    _, backend, _ = tiny
    assert contract_problems(XOmniUMM) == [] and backend_class("xomni") is XOmniUMM
    meta = json.loads((REPO / "tests" / "fixtures" / "xomni_tiny" / "meta.json").read_text())
    assert (backend.som, backend.eom, backend.image, backend.offset) == (
        meta["som_id"], meta["eom_id"], meta["image_id"], meta["image_code_offset"]
    )  # fmt: skip
    assert backend.uncond_prefix == [96, 14, 20, 14, 98]  # the fixture README's prefix for a 4 x 4 image
    p = backend.tokenize_prompts(["two cats"])
    assert p.gen_ids[0].tolist() == p.ids[0].tolist() + backend.uncond_prefix


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_greedy_rollout_equals_the_ports_generate(tiny, chunked, cfg_scale):
    _, backend, model = tiny
    prompts = backend.tokenize_prompts(PROMPTS)
    assert prompts.gen_mask.sum(1).unique().numel() == 3, "prompts of different lengths exercise left padding"
    s = SamplingConfig(greedy=True, cfg_scale=cfg_scale)
    ours = backend.generate(model, prompts, 2, s)
    assert ours.shape == (6, backend.image_len) and ours.dtype == torch.long
    assert torch.equal(ours, port_generate(backend, model, prompts, 2, cfg_scale))
    chunked(3)  # chunks of 3 rows (1 + 1 with CFG)
    assert torch.equal(backend.generate(model, prompts, 2, s), ours)


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_greedy_rollout_equals_the_teacher_forced_argmax(tiny, cfg_scale):
    _, backend, model = tiny
    prompts = backend.tokenize_prompts(PROMPTS)
    codes = backend.generate(model, prompts, 1, SamplingConfig(greedy=True, cfg_scale=cfg_scale))
    full = full_image_logprobs(backend, model, prompts, codes, cfg_scale, 1.0)
    assert torch.equal(full.argmax(-1), codes)


def test_sampling_is_seeded_and_filters_apply(tiny):
    _, backend, model = tiny
    prompts = backend.tokenize_prompts(PROMPTS[:2])
    for s, allowed in [(SamplingConfig(top_k=3, cfg_scale=2.0), "top_k"), (SamplingConfig(min_p=0.3), "min_p")]:
        a = backend.generate(model, prompts, 3, s, generator=torch.Generator().manual_seed(1))
        b = backend.generate(model, prompts, 3, s, generator=torch.Generator().manual_seed(1))
        assert torch.equal(a, b) and a.shape == (6, backend.image_len) and len(a.unique()) > 2
        full = full_image_logprobs(backend, model, prompts.repeat_interleave(3), a, s.cfg_scale, 1.0)
        lp = full.gather(-1, a[..., None])[..., 0]
        if allowed == "top_k":  # every sampled code is among the 3 best of the teacher-forced distribution
            assert int((full > lp[..., None]).sum(-1).max()) < 3
        else:  # every sampled code has at least min_p x the top probability
            assert bool((lp >= np.log(0.3) + full.max(-1).values - 1e-6).all())


# ----------------------------------------------------------------------------------------------- scoring


@pytest.mark.parametrize("cfg_scale,temperature", [(1.0, 1.0), (3.0, 1.0), (2.5, 0.7)])
def test_image_logprobs_equal_full_logits_recomputation(tiny, chunked, cfg_scale, temperature):
    _, backend, model = tiny
    prompts = backend.tokenize_prompts(PROMPTS)
    codes = torch.randint(0, backend.num_codes, (6, backend.image_len))
    lp = backend.image_logprobs(model, prompts, codes, temperature=temperature, cfg_scale=cfg_scale)
    ref = full_image_logprobs(backend, model, prompts.repeat_interleave(2), codes, cfg_scale, temperature)
    ref = ref.gather(-1, codes[..., None])[..., 0]
    assert lp.shape == codes.shape and lp.dtype == torch.float32 and lp.requires_grad
    torch.testing.assert_close(lp.double(), ref, rtol=1e-5, atol=1e-5)
    chunked(4)
    chunk = backend.image_logprobs(model, prompts, codes, temperature=temperature, cfg_scale=cfg_scale)
    torch.testing.assert_close(chunk, lp, rtol=0, atol=1e-5)


@pytest.mark.parametrize("with_eos", [False, True])
def test_prompt_logprobs_alone_equal_padded_batch_and_a_plain_forward(tiny, chunked, with_eos):
    _, backend, model = tiny
    prompts = backend.tokenize_prompts(PROMPTS)
    images = backend.decode(backend.generate(model, prompts, 1, SamplingConfig(cfg_scale=2.0)))
    assert images.dtype == np.uint8 and images.shape == (3, 64, 64, 3)
    with torch.no_grad():
        logp, mask = backend.prompt_logprobs(model, images, prompts, with_eos=with_eos)
    Lp = prompts.ids.shape[1]
    assert logp.shape == mask.shape == (3, Lp + with_eos) and torch.equal(mask[:, :Lp], prompts.mask)
    assert (logp[~mask] == 0).all() and (logp[mask] < 0).all()
    u = backend.understanding_inputs(images, prompts)
    P = u.input_ids.shape[1] - u.targets.shape[1]
    for i, text in enumerate(PROMPTS):
        one = backend.tokenize_prompts([text])
        with torch.no_grad():
            alone, m1 = backend.prompt_logprobs(model, images[i : i + 1], one, with_eos=with_eos)
            k = int(u.mask[i].sum())  # the released reward: full-width text-mode logits of the row alone
            row = torch.cat([u.input_ids[i, : P + k], torch.tensor([backend.end])])[None]
            z = model(input_ids=row).logits[0, P - 1 :].double().log_softmax(-1)
        ref = z[:k].gather(-1, u.targets[i, :k, None])[:, 0]
        if with_eos:
            ref = torch.cat([ref, z[k, backend.end][None]])
        torch.testing.assert_close(alone[m1].double(), ref, rtol=0, atol=1e-5)
        torch.testing.assert_close(alone[m1], logp[i][mask[i]], rtol=0, atol=1e-5)
    chunked(2)
    with torch.no_grad():
        torch.testing.assert_close(backend.prompt_logprobs(model, images, prompts, with_eos=with_eos)[0], logp)


def test_understanding_turn_is_the_released_chat_layout(tiny):
    _, backend, _ = tiny
    codes = torch.arange(16)[None] % backend.num_codes
    ids = backend.understanding_prefix(codes)[0].tolist()
    tok = backend.tokenizer
    text = "<SOM>4 4<IMAGE>" + "".join(f"<MM-Token-{k}>" for k in codes[0].tolist()) + "<EOM>\n" + backend.instruction
    chat = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
    assert ids == tok(chat, add_special_tokens=False)["input_ids"]  # what the released gvu_score tokenises


def test_code_rendering_is_lossless_and_refuses_other_pixels(tiny):
    _, backend, _ = tiny
    codes = torch.randint(0, backend.num_codes, (5, 16))
    images = render_codes(codes, (4, 4))
    assert images.shape == (5, 64, 64, 3) and torch.equal(read_codes(images, (4, 4), backend.num_codes), codes)
    assert torch.equal(read_codes(torch.from_numpy(images), (4, 4), backend.num_codes), codes)
    big = torch.arange(16384)[None].view(4, 4096)  # X-Omni's 16384 codes: every one a distinct colour
    assert torch.equal(read_codes(render_codes(big, (64, 64)), (64, 64), 16384), big)
    noisy = images.copy()
    noisy[0, 3, 5, 1] ^= 1
    with pytest.raises(ValueError, match="not decode's code rendering"):
        read_codes(noisy, (4, 4), backend.num_codes)
    with pytest.raises(ValueError, match="uint8"):
        read_codes(images[:, :32], (4, 4), backend.num_codes)


# ----------------------------------------------------------------------------------------------- configuration


def test_check_config_and_options(tiny, tmp_path):
    path, _, _ = tiny
    cfg = load_config(None, ["--model.backend=xomni", f"--model.path={path}", "--model.max_rows=6"])
    assert XOmniUMM.check_config(cfg.model) == []
    backend, _ = load_umm(cfg.model)
    assert backend.max_rows == 6 and backend.hw == (4, 4) and backend.instruction == "Describe the image in detail."
    assert any("no such folder" in p for p in folder_problems(str(tmp_path / "none")))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    (bad / "gvu_xomni.json").write_text(json.dumps({"reward_path": "pixels", "image_size": 50, "size": 1}))
    problems = " | ".join(folder_problems(str(bad)))
    for want in ("not 'x-omni'", "no tokenizer.json", "unknown option 'size'", "multiple of 16", "no vision_config"):
        assert want in problems
    with pytest.raises(ConfigError, match="no vision_config"):
        load_umm(load_config(None, ["--model.backend=xomni", f"--model.path={bad}"]).model)
    assert XOmniUMM.check_prompts(cfg.model, ["ok", " ", "a <SOM> b"]) == [
        "prompt 1: empty; every prompt needs at least one token",
        "prompt 'a <SOM> b' holds an X-Omni image token",
    ]


@pytest.mark.parametrize("name,stage", [("xomni_7b", 2), ("xomni_7b_zero3", 3)])
def test_shipped_configs_parse(name, stage):
    cfg = load_config(f"configs/{name}.yaml")
    assert cfg.model.backend == "xomni" and cfg.model.dtype == "bfloat16" and cfg.model.gradient_checkpointing
    assert cfg.model.attn_implementation == "flash_attention_2" and cfg.grpo.group_size >= 2
    assert json.loads((REPO / cfg.train.deepspeed).read_text())["zero_optimization"]["stage"] == stage


# ----------------------------------------------------------------------------------------------- LoRA, training


def test_lora_targets_every_decoder_linear_and_gradients_reach_them(tiny):
    import copy

    from peft import LoraConfig, get_peft_model

    _, backend, model = tiny
    targets = backend.lora_targets(load_config().lora.target_modules)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    adapted = {n.split(".lora_")[0] for n in names}
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    # every Linear of the decoder layers (adapter and head layers too), not lm_head / mm_head; no embeddings
    assert {a.split("base_model.model.", 1)[1] for a in adapted} == linears - {"lm_head", "mm_head"}
    assert len(adapted) == 7 * model.config.num_hidden_layers
    prompts = backend.tokenize_prompts(PROMPTS[:2])
    codes = torch.randint(0, backend.num_codes, (4, backend.image_len))

    def grads(m):
        m.zero_grad()
        backend.image_logprobs(m, prompts, codes, cfg_scale=3.0).sum().backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}

    g = grads(peft_model)
    assert all(g[n].abs().sum() > 0 for n in names if "lora_B" in n)  # B starts at 0: only B gets a gradient
    peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_model.train()
    g2 = grads(peft_model)
    assert all(torch.allclose(g[n], g2[n], atol=1e-6) for n in names)


def run_files(tmp_path, ckpt, zero, checkpointing=False):
    """tests/gvu/test_janus.py's run files (DeepSpeed JSON, prompts of PROMPTS' words, a 2-step YAML) and the
    overrides that make them an X-Omni run."""
    from test_janus import write_run_files

    cfg = write_run_files(tmp_path, ckpt, zero, checkpointing)
    return cfg, ["--model.backend=xomni", "--sampling.cfg_scale=2.0", "--sampling.min_p=0.03", "--grpo.beta=0.03"]


def test_two_training_steps_in_process_zero2_move_every_lora_parameter(tiny, tmp_path):
    """Two train_steps on one rank in this process, generation-scoped adapter and the end token scored."""
    from gvu import engine as E
    from gvu import train
    from gvu.data import PromptSampler, load_prompt_sets
    from gvu.metrics import PhaseTimer

    path, _, _ = tiny
    cfg, over = run_files(tmp_path, path, 2)
    over += [f"--train.output_dir={tmp_path / 'run'}", "--lora.scope=generation", "--grpo.reward_eos=true"]
    cfg = load_config(cfg, over)
    from gvu import validate

    validate.check(cfg)
    rank, world = E.init_distributed()
    backend, model = E.build(cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    engine = E.make_engine(model, cfg, world)
    sampler = PromptSampler(load_prompt_sets(cfg.data)[0], cfg.grpo.prompts_per_step, 0, rank, world)
    for step in range(2):
        m, images = train.train_step(engine, backend, sampler.batch(step), cfg, step, rank, PhaseTimer())
        assert np.isfinite(m["loss"]) and 0 < m["reward/mean"] < 1 and m["reward/group_std"] > 0
        assert images.shape == (4, 64, 64, 3)
    after = dict(engine.module.named_parameters())
    unchanged = [n for n in before if torch.equal(before[n], after[n].detach())]
    assert len(before) == 2 * 7 * 6 and not unchanged, f"LoRA parameters that did not move: {unchanged}"


@pytest.mark.slow
def test_two_training_steps_two_cpu_ranks_zero3_checkpointing(tiny, tmp_path):
    import os
    import subprocess
    import sys

    path, _, _ = tiny
    cfg, over = run_files(tmp_path, path, 3, checkpointing=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", "29531"]
    cmd += [str(REPO / "gvu" / "train.py"), str(cfg), f"--train.output_dir={tmp_path / 'run'}", *over]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(
        np.isfinite(r["loss"]) and 0 < r["reward/mean"] < 1 for r in rows
    )
    adapter = tmp_path / "run" / "adapter"
    assert "model\\.layers" in json.loads((adapter / "adapter_config.json").read_text())["target_modules"]
    # every LoRA tensor moved: the saved adapter against the run's initial one, rebuilt here from the same seed
    # (train.py seeds torch with train.seed just before building). Adam moves an entry by about lr a step, so a
    # rebuilt start that differed from the run's would fail the bound below rather than pass unnoticed.
    from safetensors.torch import load_file

    from gvu import engine as E

    saved = load_file(str(adapter / "adapter_model.safetensors"))
    torch.manual_seed(0)
    _, fresh = E.build(load_config(cfg, over))
    init = {n.replace(".default", ""): p.detach() for n, p in fresh.named_parameters() if p.requires_grad}
    assert sorted(saved) == sorted(init) and len(saved) == 2 * 7 * 6
    moved = {k: (saved[k].float() - init[k].float()).abs().max().item() for k in saved}
    assert all(0 < d < 3 * 1e-2 * 2 for d in moved.values()), moved


def test_geneval_export_writes_the_code_renderings(tiny, tmp_path):
    from PIL import Image

    from gvu import geneval

    path, backend, _ = tiny
    cfg = tmp_path / "x.yaml"
    cfg.write_text(f"model: {{backend: xomni, path: {path}}}\nsampling: {{min_p: 0.03}}\n")
    meta = tmp_path / "meta.jsonl"
    meta.write_text("".join(json.dumps({"tag": "t", "prompt": p}) + "\n" for p in PROMPTS[:2]))
    args = ["--config", str(cfg), "--metadata", str(meta), "--out", str(tmp_path / "gen"), "--samples", "2"]
    assert geneval.main(args + ["--batch", "2"]) == 0
    pngs = sorted((tmp_path / "gen").glob("*/samples/*.png"))
    assert len(pngs) == 4 and (tmp_path / "gen" / "00001" / "metadata.jsonl").exists()
    images = np.stack([np.asarray(Image.open(p)) for p in pngs])
    assert images.shape == (4, 64, 64, 3)
    codes = read_codes(images, backend.hw, backend.num_codes)  # PNG is lossless: the codes survive the export
    assert codes.shape == (4, 16) and len(codes.unique()) > 1


BENCH_IMPLS = {
    "rollout": {"ours", "hf_generate"},
    "reward": {"ours", "eager_full", "official", "body_forward"},
    "xomni_reward_paths": {"tokens", "pixels"},
}


@pytest.mark.parametrize("bench", sorted(BENCH_IMPLS))
def test_benches_include_xomni(tmp_path, bench):
    import csv
    import importlib.util

    if bench == "xomni_reward_paths":
        pytest.importorskip("diffusers")
    n = torch.get_num_threads()
    spec = importlib.util.spec_from_file_location(f"gvu_bench_{bench}", REPO / "bench" / f"{bench}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    args = ["--quick", "--out", str(tmp_path / "out.csv")] + (
        [] if bench == "xomni_reward_paths" else ["--model", "xomni"]
    )
    try:  # rollout asserts greedy equality with the port's generate; reward, that the three rewards agree
        mod.run(args)
    finally:
        torch.set_num_threads(n)
    rows = list(csv.DictReader((tmp_path / "out.csv").open()))
    assert rows and all(r["model"].startswith("xomni_tiny") for r in rows)
    assert {r["impl"] for r in rows} == BENCH_IMPLS[bench]
    if bench == "xomni_reward_paths":
        assert all(
            -1 <= float(r["spearman_tokens_vs_pixels"]) <= 1 and float(r["speedup_vs_baseline"]) > 0 for r in rows
        )


def test_bfloat16_rollout_and_scoring_run_and_track_fp32(tiny):
    import copy

    _, backend, model = tiny
    bf = copy.deepcopy(model).to(torch.bfloat16)
    prompts = backend.tokenize_prompts(PROMPTS)
    codes = backend.generate(
        bf, prompts, 2, SamplingConfig(min_p=0.03, cfg_scale=3.0), torch.Generator().manual_seed(0)
    )
    assert codes.shape == (6, backend.image_len) and int(codes.max()) < backend.num_codes
    other = torch.randint(0, backend.num_codes, codes.shape)  # unlikely codes too: log-probs far from 0
    with torch.no_grad():
        lp = backend.image_logprobs(bf, prompts, torch.cat([codes, other]), cfg_scale=3.0)
        lp32 = backend.image_logprobs(model, prompts, torch.cat([codes, other]), cfg_scale=3.0)
        r, _ = backend.prompt_logprobs(bf, backend.decode(codes), prompts.repeat_interleave(2), with_eos=True)
        r32, _ = backend.prompt_logprobs(model, backend.decode(codes), prompts.repeat_interleave(2), with_eos=True)
    assert lp.dtype == r.dtype == torch.float32 and torch.isfinite(lp).all() and torch.isfinite(r).all()
    # bf16 weights and activations: mean errors well below the values' own size (measured 1.4 % and 0.4 %)
    assert (lp - lp32).abs().mean() < 0.1 * lp32.abs().mean() and (r - r32).abs().mean() < 0.1 * r32.abs().mean()
