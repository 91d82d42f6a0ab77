"""GRPO maths against values computed by hand."""

import math

import pytest
import torch

from gvu.grpo import grpo_loss, k3_kl


def test_k3_kl_hand_values():
    logp = torch.tensor([[math.log(0.5), math.log(0.25)]])
    ref = torch.tensor([[math.log(0.25), math.log(0.25)]])
    # d = ref - logp = log(0.5): exp(d) - d - 1 = 0.5 - log 0.5 - 1 = 0.19315, and 0 where equal
    assert torch.allclose(k3_kl(logp, ref), torch.tensor([[0.5 - math.log(0.5) - 1, 0.0]]))


def test_on_policy_loss_is_minus_mean_advantage_and_gradient_is_a_times_grad_logp():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -0.5]], requires_grad=True)
    adv = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    loss, m = grpo_loss(logp, logp.detach(), adv, mask, loss_type="grpo")
    # ratio = 1: per token -A; sequence means -1 and 2; batch mean 0.5
    assert loss.item() == pytest.approx(0.5)
    loss.backward()
    # d loss / d logp_t = -A / (2 * L_i): row 0 -> -1/4 on two tokens, 0 on the masked one; row 1 -> 2/6
    want = torch.tensor([[-0.25, -0.25, 0.0], [1 / 3, 1 / 3, 1 / 3]])
    assert torch.allclose(logp.grad, want)
    assert m["ratio"].item() == pytest.approx(1.0) and m["clip_frac"].item() == 0.0


def test_loss_types_normalise_differently():
    logp = torch.zeros(2, 4)
    adv = torch.tensor([1.0, 1.0])
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    # per token -1 on 5 valid tokens
    vals = {t: grpo_loss(logp, logp, adv, mask, loss_type=t)[0].item() for t in ("grpo", "bnpo", "dr_grpo", "dapo")}
    assert vals["grpo"] == pytest.approx(-1.0)  # (-4/4 + -1/1) / 2
    assert vals["bnpo"] == pytest.approx(-1.0)  # -5 / 5
    assert vals["dr_grpo"] == pytest.approx(-5 / 8)  # -5 / (2 * 4)
    assert grpo_loss(logp, logp, adv, mask, loss_type="dapo", num_tokens=10)[0].item() == pytest.approx(-0.5)


def test_clipping_hand_values():
    old = torch.zeros(1, 2)
    logp = torch.log(torch.tensor([[1.5, 0.5]]))  # ratios 1.5 and 0.5
    # A > 0: min(1.5A, 1.2A) = 1.2A and min(0.5A, 0.8A) = 0.5A -> per token -1.2, -0.5
    loss, m = grpo_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 2, dtype=torch.bool), loss_type="bnpo")
    assert loss.item() == pytest.approx(-(1.2 + 0.5) / 2)
    assert m["clip_frac"].item() == pytest.approx(0.5)
    # A < 0: min(-1.5, -1.2) = -1.5 and min(-0.5, -0.8) = -0.8 -> per token 1.5, 0.8
    loss, m = grpo_loss(logp, old, torch.tensor([-1.0]), torch.ones(1, 2, dtype=torch.bool), loss_type="bnpo")
    assert loss.item() == pytest.approx((1.5 + 0.8) / 2)
    assert m["clip_frac"].item() == pytest.approx(0.5)
    # clip-higher: eps_high 0.6 leaves ratio 1.5 unclipped for A > 0
    loss, _ = grpo_loss(
        logp, old, torch.tensor([1.0]), torch.ones(1, 2, dtype=torch.bool), eps_high=0.6, loss_type="bnpo"
    )
    assert loss.item() == pytest.approx(-(1.5 + 0.5) / 2)


def test_clipped_tokens_get_no_gradient():
    old = torch.zeros(1, 1)
    logp = torch.log(torch.tensor([[1.5]])).requires_grad_()
    loss, _ = grpo_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 1, dtype=torch.bool))
    loss.backward()
    assert logp.grad.item() == 0.0


def test_kl_term_added_with_beta():
    logp = torch.tensor([[math.log(0.5)]])
    ref = torch.tensor([[math.log(0.25)]])
    kl = 0.5 - math.log(0.5) - 1
    loss, m = grpo_loss(logp, logp, torch.tensor([0.0]), torch.ones(1, 1, dtype=torch.bool), ref_logp=ref, beta=0.1)
    assert loss.item() == pytest.approx(0.1 * kl)
    assert m["kl"].item() == pytest.approx(kl)


def test_bad_inputs_raise_with_shapes():
    with pytest.raises(ValueError, match="shapes disagree"):
        grpo_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="needs ref_logp"):
        grpo_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1), torch.ones(1, 1, dtype=torch.bool), beta=0.1)
    with pytest.raises(ValueError, match="loss_type"):
        grpo_loss(
            torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1), torch.ones(1, 1, dtype=torch.bool), loss_type="x"
        )
