"""The toy UMM adapter on a tiny random model: rollout vs teacher forcing, log-probs vs full logits, padding."""

import numpy as np
import pytest
import torch

from gvu.models import adapter_disabled
from gvu.models.base import PromptBatch
from gvu.rollout import SamplingConfig
from gvu.toy import world as W
from gvu.toy.backend import ToyUMM
from gvu.toy.pretrain import training_batch, training_loss

PROMPTS = ["a photo of a red circle", "a photo of three stars", "a photo of a blue square left of a green heart"]


@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(0)
    adapter, model = ToyUMM.new_model(seed=0, hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    # random init gives near-uniform logits; a larger lm_head makes argmax and sampling tests meaningful
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    model.eval()
    return adapter, model


def full_code_logits(adapter, model, prompts, codes, uncond=False):
    """(N, 36, K) code logits from the HF model's own full-vocabulary forward."""
    n = codes.shape[0]
    p = prompts.repeat_interleave(n // len(prompts))
    ids, mask = adapter._prefix(p, unconditional=uncond)
    P = ids.shape[1]
    ids = torch.cat([ids, adapter.image_layout(codes)], 1)
    mask = torch.cat([mask, torch.ones(n, adapter.layout_len, dtype=torch.long)], 1)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=adapter._positions(mask)).logits
    logits = logits[:, P - 1 + adapter.code_slots]
    return logits[..., adapter.code_offset : adapter.code_offset + adapter.num_codes]


def test_prompt_batch_and_tokenizer(toy):
    adapter, _ = toy
    pb = adapter.tokenize_prompts(PROMPTS)
    assert pb.ids.shape == (3, 11) and pb.mask.sum(1).tolist() == [6, 5, 11]
    assert not pb.mask[0, :5].any() and pb.mask[0, 5:].all()  # left padding
    r = pb.repeat_interleave(2)
    assert r.ids.shape == (6, 11) and r.texts[:2] == [PROMPTS[0]] * 2 and torch.equal(r.ids[1], pb.ids[0])
    with pytest.raises(ValueError, match="outside the toy vocabulary"):
        adapter.tokenize_prompts(["a photo of a dog"])


def test_encode_decode_exact(toy):
    adapter, _ = toy
    codes = torch.randint(0, adapter.num_codes, (5, 36))
    px = adapter.decode(codes)
    assert px.shape == (5, 96, 96, 3) and px.dtype == np.uint8
    assert torch.equal(adapter.encode(px), codes)


def test_greedy_rollout_is_teacher_forced_argmax(toy):
    adapter, model = toy
    pb = adapter.tokenize_prompts(PROMPTS)
    codes = adapter.generate(model, pb, 2, SamplingConfig(greedy=True))
    assert codes.shape == (6, 36) and codes.dtype == torch.long
    assert torch.equal(codes[0], codes[1])  # greedy: the G samples agree
    with torch.no_grad():
        ref = full_code_logits(adapter, model, pb, codes).argmax(-1)
    assert torch.equal(codes, ref)
    assert len(set(codes.flatten().tolist())) > 3  # not a degenerate constant image


def test_sampled_rollout_seeded_and_logprobs_match_full_logits(toy):
    adapter, model = toy
    pb = adapter.tokenize_prompts(PROMPTS)
    s = SamplingConfig(temperature=0.7)
    a = adapter.generate(model, pb, 4, s, generator=torch.Generator().manual_seed(3))
    b = adapter.generate(model, pb, 4, s, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (12, 36)
    lp = adapter.image_logprobs(model, pb, a, temperature=0.7)
    with torch.no_grad():
        ref = torch.log_softmax(full_code_logits(adapter, model, pb, a).float() / 0.7, -1)
        ref = ref.gather(-1, a.unsqueeze(-1)).squeeze(-1)
    assert lp.dtype == torch.float32 and lp.shape == (12, 36)
    torch.testing.assert_close(lp, ref, atol=1e-4, rtol=1e-4)


def test_cfg_rollout_and_logprobs(toy):
    adapter, model = toy
    pb = adapter.tokenize_prompts(PROMPTS[:2])
    g = adapter.generate(model, pb, 1, SamplingConfig(greedy=True, cfg_scale=3.0))
    with torch.no_grad():
        c = full_code_logits(adapter, model, pb, g).float()
        u = full_code_logits(adapter, model, pb, g, uncond=True).float()
    comb = u + 3.0 * (c - u)
    assert torch.equal(g, comb.argmax(-1))
    sampled = adapter.generate(model, pb, 3, SamplingConfig(cfg_scale=2.0, top_k=20, top_p=0.9, min_p=0.01))
    assert sampled.shape == (6, 36)
    lp = adapter.image_logprobs(model, pb, g, temperature=1.3, cfg_scale=3.0)
    ref = torch.log_softmax(comb / 1.3, -1).gather(-1, g.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(lp, ref, atol=1e-4, rtol=1e-4)


def test_image_logprobs_gradients_flow(toy):
    adapter, model = toy
    pb = adapter.tokenize_prompts(PROMPTS[:2])
    codes = torch.randint(0, adapter.num_codes, (4, 36))
    model.zero_grad()
    for cfg in (1.0, 2.0):
        adapter.image_logprobs(model, pb, codes, cfg_scale=cfg).sum().backward()
    assert model.lm_head.weight.grad[adapter.code_offset :].abs().sum() > 0
    assert model.lm_head.weight.grad[: adapter.code_offset].abs().sum() == 0  # only code rows are used
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    model.zero_grad()


def test_prompt_logprobs_alone_equals_padded_batch(toy):
    adapter, model = toy
    pb = adapter.tokenize_prompts(PROMPTS)
    px = adapter.decode(torch.randint(0, adapter.num_codes, (3, 36)))
    with torch.no_grad():
        lp, mask = adapter.prompt_logprobs(model, px, pb)
        assert lp.shape == mask.shape == pb.ids.shape and torch.equal(mask, pb.mask)
        assert (lp[~mask] == 0).all() and (lp[mask] < 0).all()
        for i, t in enumerate(PROMPTS):
            alone, m1 = adapter.prompt_logprobs(model, px[i : i + 1], adapter.tokenize_prompts([t]))
            torch.testing.assert_close(lp[i][mask[i]], alone[0][m1[0]], atol=1e-5, rtol=1e-5)
        # against the HF model's full forward of the understanding sequence
        t = PROMPTS[2]
        words = adapter.encode_text(t)
        seq = adapter._understanding_prefix(adapter.encode(px[2:3]))
        seq = torch.cat([seq, torch.tensor([words])], 1)
        full = torch.log_softmax(model(input_ids=seq).logits.float(), -1)[0]
        P = seq.shape[1] - len(words)
        ref = full[P - 1 : -1].gather(-1, torch.tensor(words)[:, None])[:, 0]
        torch.testing.assert_close(lp[2][mask[2]], ref, atol=1e-5, rtol=1e-5)


def test_caption_and_training_batch(toy):
    adapter, model = toy
    px = adapter.decode(torch.randint(0, adapter.num_codes, (2, 36)))
    caps = adapter.caption(model, px)
    assert len(caps) == 2 and all(isinstance(c, str) for c in caps)
    assert all(w in adapter.tokenizer.get_vocab() for c in caps for w in c.split())
    codes = torch.randint(0, adapter.num_codes, (3, 36))
    ids, tg = training_batch(adapter, [PROMPTS[0], None, PROMPTS[1]], codes, [True, False, False])
    assert ids.shape == tg.shape
    assert (tg[1] >= adapter.code_offset).sum() == 36 and (tg[2] >= adapter.code_offset).sum() == 36
    assert (tg[0] != -100).sum() == len(PROMPTS[0].split()) + 1  # words + <eos>
    loss = training_loss(model, ids, tg)
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_save_load_round_trip(toy, tmp_path):
    adapter, model = toy
    adapter.save_pretrained(str(tmp_path), model)
    a2, m2 = ToyUMM.from_pretrained(str(tmp_path))
    pb = a2.tokenize_prompts(PROMPTS)
    assert torch.equal(pb.ids, adapter.tokenize_prompts(PROMPTS).ids)
    g1 = adapter.generate(model, pb, 1, SamplingConfig(greedy=True))
    g2 = a2.generate(m2, pb, 1, SamplingConfig(greedy=True))
    assert torch.equal(g1, g2)
    with pytest.raises(FileNotFoundError, match="not a toy UMM checkpoint"):
        ToyUMM.from_pretrained(str(tmp_path / "nothing"))


def test_peft_policy_and_reference(toy):
    peft = pytest.importorskip("peft")
    adapter, model = toy
    import copy

    lora = peft.get_peft_model(
        copy.deepcopy(model),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    pb = adapter.tokenize_prompts(PROMPTS[:2])
    codes = torch.randint(0, adapter.num_codes, (4, 36))
    pol = adapter.image_logprobs(lora, pb, codes)
    with torch.no_grad(), adapter_disabled(lora):
        ref = adapter.image_logprobs(lora, pb, codes)
    base = adapter.image_logprobs(model, pb, codes)
    torch.testing.assert_close(ref, base.detach())
    assert not torch.allclose(pol, base)
    pol.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in lora.named_parameters() if "lora_" in n)


def test_prompt_batch_slicing():
    ids, mask = torch.arange(6).view(3, 2), torch.ones(3, 2, dtype=torch.bool)
    pb = PromptBatch(ids, mask, ["x", "y", "z"], ids + 10, mask)
    assert pb[1:].texts == ["y", "z"] and pb[[2, 0]].ids.tolist() == [[4, 5], [0, 1]]
    assert pb[[2, 0]].gen_ids.tolist() == [[14, 15], [10, 11]] and pb.repeat_interleave(2).texts[:3] == ["x", "x", "y"]
    assert W.IMAGE_LEN == ToyUMM.image_len
