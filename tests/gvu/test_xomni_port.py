"""The X-Omni port against tests/fixtures/xomni_tiny, recorded with the released code under transformers 4.51.3
(scripts/make_xomni_fixture.py): logits, hidden states and greedy image generation; then the port's own invariants
(left padding, KV cache, inputs_embeds, gradient checkpointing, attention implementations)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GenerationConfig

from gvu.models.xomni import XOmniConfig, XOmniForCausalLM, position_ids_from_mask

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "xomni_tiny"
META = json.loads((FIXTURE / "meta.json").read_text())
V, K, M = META["vocab_size"], META["image_vocab_size"], META["mm_vocab_size"]
SPECIALS = [META["som_id"], META["eom_id"], META["image_id"]]
F32_MIN = torch.finfo(torch.float32).min
TOL = dict(rtol=1e-5, atol=1e-5)  # fp32; the recorded values are reproduced bit for bit on the machine that made them


@pytest.fixture(scope="module")
def rec():
    return load_file(str(FIXTURE / "recorded.safetensors"))


@pytest.fixture(scope="module")
def model():
    return XOmniForCausalLM.from_pretrained(FIXTURE, attn_implementation="sdpa").eval()


@pytest.fixture(autouse=True)
def text_mode(model):
    yield
    model.set_generation_mode("text")


def logits(model, mode, ids, **kw):
    model.set_generation_mode(mode)
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


def gen_config(**kw):
    hw = META["image_hw"]
    kw = {"do_sample": False, **kw}
    return GenerationConfig(max_new_tokens=hw[0] * hw[1], suppress_tokens=SPECIALS, pad_token_id=META["pad_id"], **kw)


def test_loads_released_folder_with_its_key_names():
    m, info = XOmniForCausalLM.from_pretrained(FIXTURE, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert sorted(m.state_dict()) == META["state_dict_keys"]
    cfg = m.config
    assert isinstance(cfg, XOmniConfig) and cfg.model_type == "x-omni"
    assert (cfg.num_mm_adap_layers, cfg.num_mm_head_layers, cfg.vocab_size, cfg.mm_vocab_size) == (2, 1, V, M)
    assert [layer.is_lm_layer for layer in m.model.layers] == [False, False, True, True, True, False]
    assert type(AutoModelForCausalLM.from_pretrained(FIXTURE)) is XOmniForCausalLM


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("mode", ["text", "image"])
def test_logits_match_released(rec, mode, attn):
    m = XOmniForCausalLM.from_pretrained(FIXTURE, attn_implementation=attn).eval()
    got, want = logits(m, mode, rec["mixed_ids"]), rec[f"logits_{mode}"]
    assert got.shape == want.shape == (1, rec["mixed_ids"].shape[1], V + M) and got.dtype == torch.float32
    active = slice(0, V) if mode == "text" else slice(V, V + K)
    inactive = torch.ones(V + M, dtype=torch.bool)
    inactive[active] = False
    torch.testing.assert_close(got[..., active], want[..., active], **TOL)
    assert (got[..., inactive] == F32_MIN).all() and (want[..., inactive] == F32_MIN).all()
    assert (got[..., active] > -1e4).all()


def test_hidden_states_match_released(model, rec):
    with torch.no_grad():
        h = model.model(input_ids=rec["mixed_ids"]).last_hidden_state
    torch.testing.assert_close(h, rec["hidden"], **TOL)


def test_greedy_image_generate_matches_released(model, rec):
    model.set_generation_mode("image")
    out = model.generate(
        inputs=rec["gen_prompt_ids"], attention_mask=rec["gen_attention_mask"], generation_config=gen_config()
    )
    assert torch.equal(out, rec["gen_greedy"])
    new = out[:, rec["gen_prompt_ids"].shape[1] :]
    assert ((new >= V) & (new < V + K)).all()  # image codes only


def test_greedy_image_generate_with_cfg_matches_released(model, rec):
    model.set_generation_mode("image")
    ids = rec["gen_cfg_prompt_ids"]
    out = model.generate(
        inputs=ids,
        attention_mask=torch.ones_like(ids),
        generation_config=gen_config(guidance_scale=META["cfg_scale"]),
        negative_prompt_ids=rec["gen_cfg_negative_ids"],
    )
    assert torch.equal(out, rec["gen_cfg"])


def test_sampled_image_generate_matches_released(model, rec):
    """The GRPO rollout's sampler (min-p 0.03, 2 samples a prompt) under the same torch seed: same probabilities,
    same draws (both sides run torch 2.13's multinomial)."""
    model.set_generation_mode("image")
    torch.manual_seed(META["sample_seed"])
    out = model.generate(
        inputs=rec["gen_prompt_ids"],
        attention_mask=rec["gen_attention_mask"],
        generation_config=gen_config(do_sample=True, **META["sample_settings"]),
    )
    assert torch.equal(out, rec["gen_sample"])
    assert not torch.equal(out[0], out[1])  # two different samples of one prompt


def test_greedy_generate_equals_teacher_forced_argmax(model, rec):
    seq, prompt_mask = rec["gen_greedy"], rec["gen_attention_mask"]
    p = prompt_mask.shape[1]
    mask = torch.cat([prompt_mask, torch.ones_like(seq[:, p:])], dim=1)
    lg = logits(model, "image", seq, attention_mask=mask, position_ids=position_ids_from_mask(mask))
    assert torch.equal(lg[:, p - 1 : -1].argmax(-1), seq[:, p:])


def two_rows(rec):
    """Two mixed text/image rows of different lengths, and the pair left-padded (ids, mask)."""
    a = rec["mixed_ids"][0]
    b = torch.cat([a[:3], a[5:24]])  # a shorter row, still with <SOM>..<IMAGE> and codes
    n = len(a)
    ids = torch.stack([a, F.pad(b, (n - len(b), 0), value=META["pad_id"])])
    mask = torch.stack([torch.ones(n, dtype=torch.long), (torch.arange(n) >= n - len(b)).long()])
    return (a, b), ids, mask


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("mode", ["text", "image"])
def test_left_padded_batch_rows_equal_each_row_alone(rec, attn, mode):
    m = XOmniForCausalLM.from_pretrained(FIXTURE, attn_implementation=attn).eval()
    rows, ids, mask = two_rows(rec)
    batch = logits(m, mode, ids, attention_mask=mask, position_ids=position_ids_from_mask(mask))
    for i, row in enumerate(rows):
        alone = logits(m, mode, row[None])
        torch.testing.assert_close(batch[i, -len(row) :], alone[0], **TOL)


def test_kv_cached_steps_equal_full_forward(model, rec):
    ids = rec["mixed_ids"]
    split = 12  # mid-image: the cached prefix holds text and mm positions, the steps hold codes, <EOM> and text
    model.set_generation_mode("image")
    with torch.no_grad():
        full = model(input_ids=ids).logits
        out = model(input_ids=ids[:, :split], use_cache=True)
        cache, steps = out.past_key_values, [out.logits[:, -1]]
        for t in range(split, ids.shape[1] - 1):
            out = model(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits[:, -1])
    assert cache.get_seq_length() == ids.shape[1] - 1
    torch.testing.assert_close(torch.stack(steps, 1), full[:, split - 1 : -1], **TOL)


def test_adapter_and_head_layers_pass_text_positions_through(model, rec):
    ids = rec["mixed_ids"]
    mm = (ids >= V)[0]
    seen = {}
    hooks = [
        layer.register_forward_hook(lambda mod, args, out, i=i: seen.__setitem__(i, (args[0], out)))
        for i, layer in enumerate(model.model.layers)
    ]
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    for i, layer in enumerate(model.model.layers):
        x, y = seen[i][0][0], seen[i][1][0]
        assert not torch.equal(x[mm], y[mm])  # image positions are always updated
        assert torch.equal(x[~mm], y[~mm]) != layer.is_lm_layer  # text positions only by the shared layers


def test_inputs_embeds_with_multimodal_mask_equals_input_ids(model, rec):
    ids = rec["mixed_ids"]
    with torch.no_grad():
        emb, mm = model.model.embed(ids)
    model.set_generation_mode("image")
    with torch.no_grad():
        got = model(inputs_embeds=emb, multimodal_mask=mm).logits
    torch.testing.assert_close(got, logits(model, "image", ids), rtol=0, atol=0)
    with pytest.raises(ValueError, match="multimodal_mask"):
        model(inputs_embeds=emb)


def test_generate_from_inputs_embeds_matches_released(model, rec):
    ids, mask = rec["gen_prompt_ids"][:1], rec["gen_attention_mask"][:1]
    assert mask.all()  # row 0 is the longer prompt: no padding
    with torch.no_grad():
        emb, mm = model.model.embed(ids)
    model.set_generation_mode("image")
    out = model.generate(inputs_embeds=emb, multimodal_mask=mm, attention_mask=mask, generation_config=gen_config())
    assert torch.equal(out, rec["gen_greedy"][:1, ids.shape[1] :])  # generate returns the new tokens only


def test_image_helpers_agree_with_the_image_mode_logits(model, rec):
    ids = rec["mixed_ids"]
    with torch.no_grad():
        h = model.model(input_ids=ids).last_hidden_state
        torch.testing.assert_close(model.image_logits(h), logits(model, "image", ids)[..., V : V + K], **TOL)
        codes = torch.arange(K)
        emb, mm = model.model.embed(model.image_token_offset + codes[None])
        assert mm.all() and torch.equal(model.embed_image_codes(codes), emb[0])
    assert model.image_token_offset == V and model.image_head_weight.shape == (K, model.config.hidden_size)
    assert model.image_head_weight.data_ptr() == model.mm_head.weight.data_ptr()  # a view: trains mm_head


def test_set_generation_mode_rejects_unknown(model):
    with pytest.raises(ValueError, match="text"):
        model.set_generation_mode("video")


def loss_and_saved_tensors(m, ids, labels):
    """(loss, number of tensors autograd saved for backward in the forward)."""
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(1) or t, lambda t: t):
        loss = m(input_ids=ids, labels=labels).loss
    return loss, len(packed)


def test_gradient_checkpointing_gives_the_same_gradients(rec):
    ids = rec["mixed_ids"]
    labels = ids.masked_fill(ids >= V, -100)  # text mode scores text targets only
    grads, saved = [], []
    for ckpt in (False, True):
        m = XOmniForCausalLM.from_pretrained(FIXTURE).train()
        if ckpt:
            m.activation_checkpointing_enable({"use_reentrant": False})
        loss, n_saved = loss_and_saved_tensors(m, ids, labels)
        loss.backward()
        saved.append(n_saved)
        grads.append({k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None})
    assert saved[1] < saved[0] / 4  # the layers' activations are recomputed, not kept (253 -> 34 here)
    assert grads[0].keys() == grads[1].keys() and any(k.startswith("model.mm_embed") for k in grads[0])
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], **TOL)


def test_bf16_logits_keep_bf16_min_in_the_inactive_part(rec):
    m = XOmniForCausalLM.from_pretrained(FIXTURE, dtype=torch.bfloat16).eval()
    got = logits(m, "image", rec["mixed_ids"])
    assert got.dtype == torch.float32 and (got[..., :V] == torch.finfo(torch.bfloat16).min).all()
    torch.testing.assert_close(got[..., V : V + K], rec["logits_image"][..., V : V + K], rtol=0.05, atol=0.5)


def test_loss_is_cross_entropy_over_the_full_width(model, rec):
    ids = rec["mixed_ids"]
    labels = ids.masked_fill(ids >= V, -100)
    model.set_generation_mode("text")
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels)
    want = F.cross_entropy(out.logits[0, :-1], labels[0, 1:], ignore_index=-100)
    torch.testing.assert_close(out.loss, want, **TOL)


@pytest.mark.cuda
@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="needs flash-attn")
def test_flash_attention_2_matches_sdpa_on_gpu(rec):
    kw = dict(dtype=torch.bfloat16, device_map="cuda")
    ids = rec["mixed_ids"].cuda()
    out = {}
    for attn in ("sdpa", "flash_attention_2"):
        m = XOmniForCausalLM.from_pretrained(FIXTURE, attn_implementation=attn, **kw).eval()
        out[attn] = logits(m, "image", ids)[..., V : V + K]
    torch.testing.assert_close(out["flash_attention_2"], out["sdpa"], rtol=2e-2, atol=5e-2)
