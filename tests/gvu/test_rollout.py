"""The shared decode loop (gvu/rollout.py): inverse-CDF sampling, the preallocated KV cache, the shared prefill."""

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaModel

from gvu.rollout import PreallocatedCache, SamplingConfig, prompt_groups, sample_images, sample_next


def test_sample_next_draws_each_token_with_its_probability():
    torch.manual_seed(0)
    logits = torch.randn(1, 12) * 1.5
    n = 200_000
    g = torch.Generator().manual_seed(1)
    draws = sample_next(logits.expand(n, -1), SamplingConfig(), g)
    freq = torch.bincount(draws, minlength=12).double() / n
    p = logits.double().softmax(-1)[0]
    se = (p * (1 - p) / n).sqrt()
    assert ((freq - p).abs() / se).max() < 5  # every token within 5 standard errors of its probability


def test_sample_next_never_draws_filtered_tokens():
    logits = torch.tensor([[3.0, 2.5, 2.0, -1.0, -2.0, 0.5]]).expand(50_000, -1)
    draws = sample_next(logits, SamplingConfig(top_k=3), torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {0, 1, 2}
    draws = sample_next(logits, SamplingConfig(min_p=0.3), torch.Generator().manual_seed(0))
    assert set(draws.tolist()) <= {0, 1, 2} and 0 in set(draws.tolist())


def test_a_draw_that_rounds_up_to_the_total_mass_takes_the_last_token_with_mass(monkeypatch):
    logits = torch.tensor([[1.0, 2.0, 0.0, float("-inf"), float("-inf")]])
    monkeypatch.setattr(torch, "rand", lambda shape, **kw: torch.ones(shape, dtype=kw.get("dtype")))
    assert sample_next(logits, SamplingConfig()).tolist() == [2]  # not 4 (searchsorted's "past the end")


def test_prompt_groups_cover_every_row_once_in_order():
    chunks = prompt_groups(3, 4, 5)  # 12 rows in chunks of 5: prompt 1 spans the first two chunks
    assert [(i.tolist(), c.tolist()) for i, c in chunks] == [([0, 1], [4, 1]), ([1, 2], [3, 2]), ([2], [2])]


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, attn_implementation="sdpa",
    )  # fmt: skip
    return LlamaModel(cfg).eval()


def test_preallocated_cache_gives_the_dynamic_cache_outputs_without_reallocating(llama):
    ids = torch.randint(1, 50, (3, 7))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # a left-padded row
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    caches = DynamicCache(), PreallocatedCache(2, 7 + 4)
    outs = [llama(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=c).last_hidden_state
            for c in caches]  # fmt: skip
    ptr = caches[1].layers[0].k_buf.data_ptr()
    for t in range(4):
        step, mask = torch.randint(1, 50, (3, 1)), torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1)
        p = pos[:, -1:] + 1 + t
        outs += [llama(input_ids=step, attention_mask=mask, position_ids=p, past_key_values=c).last_hidden_state
                 for c in caches]  # fmt: skip
    for a, b in zip(outs[::2], outs[1::2], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert caches[1].layers[0].k_buf.data_ptr() == ptr  # written in place: no copy of the cache per step
    assert caches[1].get_seq_length() == 11
    with pytest.raises(RuntimeError, match="capacity"):
        llama(input_ids=step, attention_mask=torch.ones(3, 12, dtype=torch.long), position_ids=p + 1,
              past_key_values=caches[1])  # fmt: skip


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_a_shared_prefill_samples_what_a_prefill_per_row_samples(llama, cfg_scale):
    """Two prompts x 3 samples with one prefill per prompt == six prompt rows prefilled one each (greedy tokens and,
    seeded, sampled ones)."""
    torch.manual_seed(1)
    ids = torch.randint(1, 50, (2, 5))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    u_ids = torch.full_like(ids, 1)
    head = torch.nn.Linear(32, 16)
    head.weight.data.mul_(10)  # peaked logits: batch-shape roundings cannot flip an argmax
    common = dict(steps=6, fed_len=5, feed=lambda tok, t: {"input_ids": tok[:, None] + 20}, logits=head)

    def run(i, m, ui, counts, sampling):
        uncond = ({"input_ids": ui}, m) if cfg_scale > 1 else None
        g = torch.Generator().manual_seed(0)
        return sample_images(llama, {"input_ids": i}, m, counts, sampling=sampling, generator=g, uncond=uncond,
                             **common)  # fmt: skip

    for sampling in (SamplingConfig(greedy=True, cfg_scale=cfg_scale), SamplingConfig(cfg_scale=cfg_scale)):
        shared = run(ids, mask, u_ids, torch.tensor([3, 3]), sampling)
        r = torch.arange(2).repeat_interleave(3)
        per_row = run(ids[r], mask[r], u_ids[r], torch.ones(6, dtype=torch.long), sampling)
        assert shared.shape == (6, 6)
        assert torch.equal(shared, per_row)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_the_fixed_shape_decode_samples_what_the_growing_one_does(llama, attn, cfg_scale):
    """The static path (the CUDA graph's step, run eagerly here) with steps of one and of two tokens (the toy's end
    of row) gives the growing-cache path's tokens, greedy and seeded."""
    llama.config._attn_implementation = attn
    try:
        torch.manual_seed(2)
        ids = torch.randint(1, 50, (2, 5))
        mask = torch.ones_like(ids)
        mask[0, :3] = 0
        head = torch.nn.Linear(32, 16)
        head.weight.data.mul_(10)  # peaked logits: last-bit differences between the paths cannot flip an argmax

        def feed(tok, t):
            x = tok[:, None] + 20
            return {"input_ids": torch.cat([x, torch.full_like(x, 49)], 1) if t % 3 == 2 else x}

        common = dict(steps=8, fed_len=12, feed=feed, width=lambda t: 2 if t % 3 == 2 else 1, logits=head)
        uncond = ({"input_ids": torch.ones_like(ids)}, mask) if cfg_scale > 1 else None
        for sampling in (SamplingConfig(greedy=True, cfg_scale=cfg_scale), SamplingConfig(cfg_scale=cfg_scale)):
            outs = [
                sample_images(llama, {"input_ids": ids}, mask, torch.tensor([2, 3]), sampling=sampling, uncond=uncond,
                              generator=torch.Generator().manual_seed(0), static=static, **common)
                for static in (False, True)
            ]  # fmt: skip
            assert torch.equal(outs[0], outs[1])
    finally:
        llama.config._attn_implementation = "sdpa"


def test_sampled_cfg_combines_as_the_greedy_formula_does(llama, monkeypatch):
    """Sampling combines the branches with torch.lerp (one pass), greedy with transformers' formula: the logits
    handed to the sampler agree to rounding (a swapped lerp argument would not)."""
    import gvu.rollout as R

    torch.manual_seed(3)
    ids = torch.randint(1, 50, (2, 5))
    mask = torch.ones_like(ids)
    seen = []

    def record(z, sampling, generator=None):
        seen.append(z.clone())
        return z.argmax(-1)

    monkeypatch.setattr(R, "sample_next", record)
    common = dict(
        steps=3, fed_len=2, feed=lambda tok, t: {"input_ids": tok[:, None] + 20}, logits=torch.nn.Linear(32, 16)
    )
    uncond = ({"input_ids": torch.ones_like(ids)}, mask)
    for greedy in (True, False):
        R.sample_images(llama, {"input_ids": ids}, mask, torch.tensor([2, 1]), uncond=uncond,
                        sampling=SamplingConfig(greedy=greedy, cfg_scale=4.0), **common)  # fmt: skip
    assert len(seen) == 6
    for a, b in zip(seen[:3], seen[3:], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cfg_scale", [1.0, 4.0])
def test_a_split_head_hands_the_sampler_the_logits_of_the_whole_head(llama, monkeypatch, cfg_scale):
    """HeadParts (features, then an affine projection): sampling combines CFG on the features and projects half the
    rows; the logits handed to the sampler equal the whole head's CFG-combined logits to rounding, and a projection
    that is not the head's last layer (its bias doubled) is caught, so the split path is the one that ran."""
    import gvu.rollout as R

    torch.manual_seed(4)
    ids = torch.randint(1, 50, (2, 5))
    mask = torch.ones_like(ids)
    first, last = torch.nn.Linear(32, 24), torch.nn.Linear(24, 16)
    head = torch.nn.Sequential(first, torch.nn.GELU(), last)
    seen = []

    def record(z, sampling, generator=None):
        seen.append(z.clone())
        return z.argmax(-1)

    monkeypatch.setattr(R, "sample_next", record)
    common = dict(steps=3, fed_len=2, feed=lambda tok, t: {"input_ids": tok[:, None] + 20}, logits=head)
    uncond = ({"input_ids": torch.ones_like(ids)}, mask) if cfg_scale > 1 else None
    features = lambda h: torch.nn.functional.gelu(first(h))  # noqa: E731
    wrong = R.AffineProjection(last.weight, 2 * last.bias)
    for parts in (
        None,
        R.HeadParts(features, R.AffineProjection(last.weight, last.bias)),
        R.HeadParts(features, wrong),
    ):
        R.sample_images(llama, {"input_ids": ids}, mask, torch.tensor([2, 1]), uncond=uncond, head=parts,
                        sampling=SamplingConfig(cfg_scale=cfg_scale), **common)  # fmt: skip
    assert len(seen) == 9 and seen[0].shape == (3, 16)
    for a, b, c in zip(seen[:3], seen[3:6], seen[6:], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        assert (c - a).abs().max() > 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_affine_projection_is_the_linear_at_every_row_count(dtype, bias):
    """The packed-weight projection (MKL on CPU in fp32, F.linear otherwise) == F.linear at each row count, the
    first call at a count packing its weight and a repeated count reusing that packing."""
    from gvu.rollout import AffineProjection

    torch.manual_seed(5)
    w, b = torch.randn(300, 64, dtype=dtype), torch.randn(300, dtype=dtype) if bias else None
    project = AffineProjection(w, b)
    for m in (1, 8, 8, 3):
        x = torch.randn(m, 64, dtype=dtype)
        out = project(x)
        assert out.shape == (m, 300) and out.dtype == dtype
        torch.testing.assert_close(out, torch.nn.functional.linear(x, w, b))
