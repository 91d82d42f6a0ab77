"""The backend contract (gvu/models/base.py), checked on every registered backend with a tiny random model."""

import numpy as np
import pytest
import torch

from gvu.config import ConfigError, SamplingConfig, load_config
from gvu.models import Ability, backend_class, backend_names, contract_problems, policy_updates, register_backend
from gvu.testing import TINY_BACKENDS, TINY_PROMPTS, TINY_QUESTIONS, tiny_backend

G = 2


@pytest.fixture(scope="module", params=backend_names())
def tiny(request, tmp_path_factory):
    name = request.param
    assert name in TINY_BACKENDS, f"backend {name!r} has no tiny model in gvu.testing.TINY_BACKENDS"
    backend, model = tiny_backend(name, str(tmp_path_factory.mktemp(name)))
    return name, backend, model, backend.tokenize_prompts(TINY_PROMPTS[name])


def test_class_meets_the_contract(tiny):
    name, backend, _, _ = tiny
    cls = backend_class(name)
    assert contract_problems(cls) == [] and cls.name == name and isinstance(backend, cls)


def test_prompt_batch(tiny):
    _, _, _, p = tiny
    B = len(TINY_PROMPTS[tiny[0]])
    assert len(p) == B and p.texts == TINY_PROMPTS[tiny[0]]
    for ids, mask in ((p.ids, p.mask), (p.gen_ids, p.gen_mask)):
        assert ids.dtype == torch.int64 and mask.dtype == torch.bool and ids.shape == mask.shape and ids.shape[0] == B
        assert bool(mask[:, -1].all()), "left padding: every row ends with a real token"
    assert p.repeat_interleave(G)[1].texts == [p.texts[0]]


def test_rollout_decode_and_image_logprobs(tiny):
    _, backend, model, p = tiny
    gen = torch.Generator().manual_seed(0)
    tokens = backend.generate(model, p, G, SamplingConfig(temperature=1.0), generator=gen)
    assert tokens.dtype == torch.int64 and tokens.shape == (len(p) * G, backend.image_len)
    assert int(tokens.min()) >= 0 and int(tokens.max()) < backend.num_codes
    greedy = SamplingConfig(greedy=True)
    assert torch.equal(backend.generate(model, p, G, greedy), backend.generate(model, p, G, greedy))
    pixels = backend.decode(tokens)
    assert isinstance(pixels, np.ndarray) and pixels.dtype == np.uint8
    assert pixels.ndim == 4 and pixels.shape[0] == len(tokens) and pixels.shape[-1] == 3
    for cfg_scale in (1.0, 3.0):
        lp = backend.image_logprobs(model, p, tokens, temperature=1.0, cfg_scale=cfg_scale)
        assert lp.dtype == torch.float32 and lp.shape == tokens.shape
        assert torch.isfinite(lp).all() and bool((lp <= 1e-6).all())


def test_prompt_logprobs_equal_a_plain_forward_of_understanding_inputs(tiny):
    """The reward's one pass (head only at prompt positions) against the full-vocabulary softmax of a plain
    forward of the same rows, row by row."""
    _, backend, model, p = tiny
    tokens = backend.generate(model, p, G, SamplingConfig(greedy=True))
    images, rows = backend.decode(tokens), p.repeat_interleave(G)
    logp, mask = backend.prompt_logprobs(model, images, rows, with_eos=False)
    assert logp.dtype == torch.float32 and mask.dtype == torch.bool and logp.shape == mask.shape == rows.ids.shape
    u = backend.understanding_inputs(images, rows)
    P = u.input_ids.shape[1] - u.targets.shape[1]
    with torch.no_grad():
        logits = model(input_ids=u.input_ids, **u.forward_kwargs).logits.double()
    plain = torch.log_softmax(logits[:, P - 1 : -1], -1).gather(-1, u.targets.unsqueeze(-1)).squeeze(-1)
    for i in range(len(rows)):
        torch.testing.assert_close(logp[i][mask[i]].double(), plain[i][u.mask[i]], rtol=1e-4, atol=1e-5)


def test_answer_logprobs_equal_a_plain_forward_row_by_row_and_do_not_depend_on_the_batch(tiny):
    """answer_logprobs (one pass, head only at the answers' positions) against the full-vocabulary softmax of a plain
    forward of understanding_inputs(question=...), row by row; each row alone gives the same values."""
    name, backend, model, p = tiny
    assert name in TINY_QUESTIONS, f"backend {name!r} has no (question, answer) pairs in gvu.testing.TINY_QUESTIONS"
    questions, answers = map(list, zip(*TINY_QUESTIONS[name], strict=True))
    images = backend.decode(backend.generate(model, p, G, SamplingConfig(greedy=True)))[: len(questions)]
    with torch.no_grad():
        logp, mask = backend.answer_logprobs(model, images, questions, answers)
    want = backend.tokenize_prompts(answers)
    assert logp.dtype == torch.float32 and mask.dtype == torch.bool and torch.equal(mask, want.mask)
    assert bool((logp[~mask] == 0).all()) and bool((logp[mask] < 0).all())
    for i, (q, a) in enumerate(zip(questions, answers, strict=True)):
        u = backend.understanding_inputs(images[i : i + 1], want[i], question=q)
        P = u.input_ids.shape[1] - u.targets.shape[1]
        with torch.no_grad():
            logits = model(input_ids=u.input_ids, **u.forward_kwargs).logits.double()
            alone, m1 = backend.answer_logprobs(model, images[i : i + 1], [q], [a])
        plain = torch.log_softmax(logits[:, P - 1 : -1], -1).gather(-1, u.targets.unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(logp[i][mask[i]].double(), plain[0][u.mask[0]], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(alone[0][m1[0]], logp[i][mask[i]], rtol=1e-5, atol=1e-6)
    # the question matters: the same answer after another question is scored differently
    with torch.no_grad():
        other, _ = backend.answer_logprobs(model, images[:1], [questions[1]], [answers[0]])
    assert not torch.allclose(other[0][mask[0][-other.shape[1] :]], logp[0][mask[0]])


def test_declared_abilities_work_and_undeclared_ones_are_refused_by_the_config_check(tiny, tmp_path):
    from gvu import validate

    name, backend, model, p = tiny
    images = backend.decode(backend.generate(model, p, 1, SamplingConfig(greedy=True)))
    if Ability.END_TOKEN in backend.abilities:
        logp, mask = backend.prompt_logprobs(model, images, p, with_eos=True)
        assert logp.shape == (len(p), p.ids.shape[1] + 1) and bool(mask[:, -1].all())
    if Ability.CAPTION in backend.abilities:
        caps = backend.caption(model, images)
        assert isinstance(caps, list) and len(caps) == len(p) and all(isinstance(c, str) for c in caps)
    if Ability.LORA_NARROWING in backend.abilities:
        assert backend.lora_targets(["q_proj"])
    if Ability.IMAGE_HEAD_UPDATE in backend.abilities:
        from peft import LoraConfig, get_peft_model

        peft = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
        backend.add_image_head_update(peft)
        assert policy_updates(peft)
    # the options that need a missing ability fail the one config check, naming the backend and the option
    options = {
        Ability.END_TOKEN: "--grpo.reward_eos=true",
        Ability.IMAGE_HEAD_UPDATE: "--lora.image_head=factorised",
        Ability.QUESTIONS: "--grpo.rewards=[{name: yes_prob, weight: 1.0}]",
    }
    for ability, option in options.items():
        if ability not in backend.abilities:
            cfg = load_config(None, [f"--model.backend={name}", option])
            with pytest.raises(ConfigError, match=f"model.backend={name!r}.*{ability.value}|{ability.value}.*{name}"):
                validate.check(cfg)


def test_check_config_names_a_missing_checkpoint(tiny, tmp_path):
    name = tiny[0]
    cfg = load_config(None, [f"--model.backend={name}", f"--model.path={tmp_path / 'nowhere'}"])
    problems = backend_class(name).check_config(cfg.model)
    assert problems and all("model.path" in m for m in problems)


def test_registry_lists_known_backends_and_takes_new_ones():
    with pytest.raises(ConfigError, match=r"known: \["):
        backend_class("nope")

    class Broken:
        name, abilities = "broken", frozenset({Ability.CAPTION})

    register_backend("broken", Broken)
    try:
        with pytest.raises(TypeError, match="caption"):
            backend_class("broken")
    finally:
        from gvu.models import _REGISTRY

        _REGISTRY.pop("broken")


def test_memory_shape_is_read_from_the_saved_checkpoint(tiny, tmp_path):
    """memory_shape(cfg.model) reads config.json without weights and gives the sizes the loaded backend plans with."""
    name, backend, model, _ = tiny
    backend.save_pretrained(str(tmp_path / "ckpt"), model)
    cfg = load_config(None, [f"--model.backend={name}", f"--model.path={tmp_path / 'ckpt'}"])
    shape = backend_class(name).memory_shape(cfg.model)
    assert shape == backend.rows.shape
    assert shape.codes == backend.num_codes and shape.image_tokens >= backend.image_len
    text = model.config.get_text_config()
    assert (shape.layers, shape.hidden) == (text.num_hidden_layers, text.hidden_size)
    assert shape.heads % shape.kv_heads == 0 and shape.head_dim * shape.heads >= shape.hidden // 2


def test_rows_per_forward_leave_outputs_unchanged_and_the_plan_is_consulted(tiny):
    """Greedy tokens, image and prompt log-probs: one row per forward == all rows at once (explicit max_rows), and
    with max_rows=0 a budget too small for one row stops rollout with the config error."""
    _, backend, model, p = tiny
    greedy = SamplingConfig(greedy=True, cfg_scale=3.0)
    rows = p.repeat_interleave(G)

    def outputs():
        tokens = backend.generate(model, p, G, greedy)
        with torch.no_grad():
            lp = backend.image_logprobs(model, p, tokens, cfg_scale=3.0)
            rw = backend.prompt_logprobs(model, backend.decode(tokens), rows)[0]
        return tokens, lp, rw

    planner = backend.rows
    try:
        planner.max_rows = 0
        whole = outputs()
        planner.max_rows = 1  # one conditional + unconditional pair (or one row) per forward
        one = outputs()
        planner.max_rows, planner.budget_gb, planner._budget = 0, 1e-9, None
        with pytest.raises(ConfigError, match="model.memory_budget_gb"):
            backend.generate(model, p, G, greedy)
    finally:
        planner.max_rows, planner.budget_gb, planner._budget = 0, 0.0, None
    assert torch.equal(whole[0], one[0])
    torch.testing.assert_close(whole[1], one[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(whole[2], one[2], rtol=1e-5, atol=1e-5)
