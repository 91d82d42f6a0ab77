import json

import torch

from gvu.toy import world as W
from gvu.toy.backend import ToyUMM
from gvu.toy.modeling import FactorisedCodeRows
from gvu.toy.pretrain import main


def test_factorised_code_rows_are_sums_of_attribute_rows_and_leave_other_rows_free():
    offset, d = 7, 5
    p = FactorisedCodeRows(offset, d)
    weight = torch.randn(offset + W.NUM_CODES + 3, d)
    out = p(weight)
    assert out.shape == weight.shape
    assert torch.equal(out[:offset], weight[:offset]) and torch.equal(out[offset + W.NUM_CODES :], weight[-3:])
    n_s, n_c = len(W.SHAPES), len(W.COLORS)
    t = p.table.detach()
    assert torch.allclose(out[offset], t[0])  # the empty cell
    for code in (1, 57, 120):
        s, c, z = W.attrs_of(code)
        assert torch.allclose(out[offset + code], t[1 + s] + t[1 + n_s + c] + t[1 + n_s + n_c + z])


def test_tiny_factorised_pretraining_saves_a_plain_checkpoint_with_additive_code_rows(tmp_path):
    out = tmp_path / "ckpt"
    tiny = ["--hidden", "32", "--layers", "1", "--heads", "2", "--ffn", "64", "--batch", "8"]
    main(
        ["--out", str(out), "--steps", "3", "--eval-every", "0", "--final-samples", "1", "--head", "factorised", *tiny]
    )
    adapter, model = ToyUMM.from_pretrained(str(out))  # a plain LlamaForCausalLM: no parametrisation left
    assert set(model.lm_head.state_dict()) == {"weight"}
    rows = model.lm_head.weight.detach()[adapter.code_offset : adapter.code_offset + W.NUM_CODES]
    # additive: the change from one colour to another is the same vector for every shape and size
    red, blue = W.COLORS.index("red"), W.COLORS.index("blue")
    deltas = [rows[W.code_of(s, blue, z)] - rows[W.code_of(s, red, z)] for s in range(len(W.SHAPES)) for z in (0, 1)]
    assert deltas[0].abs().max() > 0
    assert all(torch.allclose(x, deltas[0], atol=1e-6) for x in deltas)
    assert json.loads((out / "pretrain_eval.json").read_text())["args"]["head"] == "factorised"


def test_residual_factorised_update_starts_at_the_head_and_moves_a_colour_for_every_shape():
    offset, d = 3, 4
    p = FactorisedCodeRows(offset, d, init=0.0, residual=True)
    weight = torch.randn(offset + W.NUM_CODES, d)
    assert torch.equal(p(weight), weight)
    with torch.no_grad():
        p.table[1 + len(W.SHAPES) + W.COLORS.index("green")] += 1.0  # the green row of the update
    moved = (p(weight) - weight).abs().sum(1) > 0
    green = [offset + W.code_of(s, W.COLORS.index("green"), z) for s in range(len(W.SHAPES)) for z in (0, 1)]
    assert moved.nonzero().flatten().tolist() == green
