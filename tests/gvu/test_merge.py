"""gvu.merge: a run's adapter (LoRA + image-head update) folded into its base gives the adapted model's outputs."""

import torch

from gvu import merge
from gvu.checkpoint import save_adapter
from gvu.config import load_config
from gvu.engine import build_policy
from gvu.toy.backend import ToyUMM


def trained_run(tmp_path, lora: str):
    """A toy base in tmp_path/base, a config naming it with `lora` (YAML flow mapping), and its saved adapter
    made to look trained (LoRA B and the head update away from their zero init) -> (config file, policy, ids)."""
    base = tmp_path / "base"
    backend, model = ToyUMM.new_model(seed=0)
    backend.save_pretrained(str(base), model)
    cfg_file = tmp_path / "config.yaml"
    cfg_file.write_text(f"model: {{backend: toy, path: {base}}}\nlora: {lora}\n")
    policy = build_policy(load_config(str(cfg_file), []), backend, model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters():
            if p.requires_grad:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    save_adapter(policy, tmp_path / "adapter", step=1, is_main=True)
    return cfg_file, policy, torch.randint(0, model.config.vocab_size, (2, 20), generator=g)


def test_merged_checkpoint_matches_the_adapted_model(tmp_path, capsys):
    cfg_file, policy, ids = trained_run(tmp_path, "{image_head: factorised}")
    base = tmp_path / "base"
    with torch.no_grad():
        want = policy(input_ids=ids).logits

    out = tmp_path / "merged"
    assert merge.main(["--config", str(cfg_file), "--adapter", str(tmp_path / "adapter"), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "world.json"]
    )
    _, merged = ToyUMM.from_pretrained(str(out))
    with torch.no_grad():
        got = merged(input_ids=ids).logits
    assert (got - want).abs().max() < 1e-4
    with torch.no_grad():
        plain = ToyUMM.from_pretrained(str(base))[1](input_ids=ids).logits
    assert (plain - want).abs().max() > 1e-2  # the adapter changed the outputs, so the comparison above has teeth

    # nothing is overwritten: a second merge into the same folder is refused with the reason
    assert merge.main(["--config", str(cfg_file), "--adapter", str(tmp_path / "adapter"), "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err


def test_a_split_runs_parts_merge_to_the_model_each_direction_ran(tmp_path, capsys):
    """lora.scope=split: --part generation gives the generation passes' model (LoRA + head update), --part
    understanding the understanding passes' (its adapter alone); without --part the merge is refused."""
    from gvu.models import understanding_passes

    cfg_file, policy, ids = trained_run(tmp_path, "{image_head: factorised, scope: split}")
    with torch.no_grad():
        want = {"generation": policy(input_ids=ids).logits}
        with understanding_passes(policy, "split"):
            want["understanding"] = policy(input_ids=ids).logits
    assert (want["generation"] - want["understanding"]).abs().max() > 1e-2
    args = ["--config", str(cfg_file), "--adapter", str(tmp_path / "adapter")]
    assert merge.main([*args, "--out", str(tmp_path / "none")]) == 2
    assert "--part generation or --part understanding" in capsys.readouterr().err
    for part, logits in want.items():
        out = tmp_path / part
        assert merge.main([*args, "--out", str(out), "--part", part]) == 0
        with torch.no_grad():
            got = ToyUMM.from_pretrained(str(out))[1](input_ids=ids).logits
        assert (got - logits).abs().max() < 1e-4, part
