"""Test scaffolding: tiny random models of every backend, built offline (tests and benchmarks; not the trainer).

tiny_backend("toy"|"janus", folder) -> (backend, model)   # what tests/gvu/test_backends.py checks
make_tiny_janus(folder, words, real_layout=True)          # Janus-Pro's image layout, a small body (benchmarks)
"""

from __future__ import annotations

import copy

import torch

from gvu.models.janus import BOI, BOS, EOI, EOS, IMAGE, INSTRUCTION, PAD, JanusUMM
from gvu.rewards.qa import TEMPLATE_WORDS


def tiny_janus_tokenizer(words: list[str]):
    """An offline PreTrainedTokenizerFast (WordLevel over `words` and the chat-format pieces) with Janus's
    special tokens, for tests and benchmarks."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Whitespace()
    corpus = f"{JanusUMM.user} {JanusUMM.assistant} {INSTRUCTION} " + " ".join(words)
    pieces = dict.fromkeys(["<unk>"] + [w for w, _ in pre.pre_tokenize_str(corpus)])
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(pieces)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token="<unk>", padding_side="left"
    )
    fast.add_special_tokens({"additional_special_tokens": [IMAGE, BOI, EOI]})
    return fast


def tiny_janus_config(vocab_size: int, image_token_id: int, **text_overrides):
    """A tiny random JanusConfig: Llama d=64 x 2 layers, SigLIP d=32 x 1 on 32 px (16 patches), a 4-level VQ
    (32 channels, 64 codes) decoding a 4x4 grid to 32 px."""
    from transformers import JanusConfig, LlamaConfig

    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        **text_overrides,
    )
    vision = dict(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8,
        projection_dim=64, num_image_tokens=16, mlp_ratio=2.0,
    )  # fmt: skip
    vq = dict(
        embed_dim=8, num_embeddings=64, latent_channels=32, base_channels=32, channel_multiplier=[1, 1, 1, 1],
        num_res_blocks=1, projection_dim=64, image_token_embed_dim=64, num_hidden_layers=2,
    )  # fmt: skip
    cfg = JanusConfig(
        text_config=text.to_dict(),
        vision_config=vision,
        vq_config=vq,
        image_token_id=image_token_id,
        tie_word_embeddings=False,
    )
    return cfg


def real_layout_janus_config(vocab_size: int, image_token_id: int, hidden: int = 256, layers: int = 2):
    """A random JanusConfig with Janus-Pro's layout and a small body: 384 px images as a 24 x 24 grid of 576 codes
    from 16384 (the VQ's 5 levels, 8-dim codes, at 32 base channels instead of 128), SigLIP d=64 x 1 at 384 / 16
    (576 understanding tokens), generation head and embeddings at the body's width (Janus-Pro: 2048 = d), Janus-Pro's
    text vocabulary of 102400 (what a full-logits reward pays for; the tiny tokenizer uses the first ids), and a
    Llama body d=`hidden` x `layers` (heads of 64, MLP 2.75 d, as Janus-Pro-1B's 2048 / 5632)."""
    return _janus_layout_config(max(vocab_size, 102400), image_token_id, hidden, layers, full=False)


def janus_pro_1b_config(vocab_size: int, image_token_id: int):
    """A random JanusConfig at Janus-Pro-1B's published shapes: Llama d=2048 x 24 layers (16 heads, MLP 5632, vocab
    102400), SigLIP-L/16 at 384 px (d=1024 x 24, 576 tokens), the VQ of 16384 8-dim codes at 128 base channels,
    generation head and embeddings at 2048. 2.1B parameters: for GPU benchmarks (bench/*.py --shapes 1b)."""
    return _janus_layout_config(max(vocab_size, 102400), image_token_id, 2048, 24, full=True)


def _janus_layout_config(vocab_size: int, image_token_id: int, hidden: int, layers: int, full: bool):
    from transformers import JanusConfig, LlamaConfig

    heads = max(1, hidden // 64)
    text = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=5632 if full else int(2.75 * hidden),
        num_hidden_layers=layers, num_attention_heads=16 if full else heads, num_key_value_heads=16 if full else heads,
        max_position_embeddings=16384 if full else 1024, tie_word_embeddings=False,
    )  # fmt: skip
    vision = dict(
        hidden_size=1024 if full else 64, num_hidden_layers=24 if full else 1, num_attention_heads=16 if full else 2,
        image_size=384, patch_size=16, projection_dim=hidden, num_image_tokens=576, mlp_ratio=4.0 if full else 2.0,
    )  # fmt: skip
    vq = dict(
        embed_dim=8, num_embeddings=16384, latent_channels=32, base_channels=128 if full else 32,
        channel_multiplier=[1, 1, 2, 2, 4], num_res_blocks=2 if full else 1, projection_dim=hidden,
        image_token_embed_dim=hidden, num_hidden_layers=2,
    )  # fmt: skip
    return JanusConfig(
        text_config=text.to_dict(), vision_config=vision, vq_config=vq, image_token_id=image_token_id,
        tie_word_embeddings=False,
    )  # fmt: skip


def build_janus(
    words: list[str], seed: int = 0, layout: str = "tiny", device=None, dtype=torch.float32, attn: str = "sdpa"
):
    """(JanusUMM adapter, random eval-mode JanusForConditionalGeneration) in memory; layout "tiny"
    (tiny_janus_config), "real" (Janus-Pro's layout, small body) or "1b" (Janus-Pro-1B's shapes), the weights
    initialised on `device` in `dtype`, attention `attn` (sdpa, eager, flash_attention_2)."""
    from transformers import GenerationConfig, JanusForConditionalGeneration

    tok = tiny_janus_tokenizer(words)
    build = {"tiny": tiny_janus_config, "real": real_layout_janus_config, "1b": janus_pro_1b_config}[layout]
    cfg = build(len(tok), tok.convert_tokens_to_ids(IMAGE))
    torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        model = JanusForConditionalGeneration._from_config(cfg, attn_implementation=attn).to(dtype).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        generation_kwargs={"boi_token_id": tok.convert_tokens_to_ids(BOI)},
    )
    size = cfg.vision_config.image_size
    adapter = JanusUMM(tok, cfg, copy.deepcopy(model.model.vqmodel), model.generation_config, {"size": size})
    return adapter, model


def make_tiny_janus(path: str, words: list[str], seed: int = 0, real_layout: bool = False) -> str:
    """Write a tiny random Janus checkpoint (weights, tokenizer, generation and preprocessor configs) to `path`;
    `real_layout`: Janus-Pro's image layout with a small body (real_layout_janus_config)."""
    adapter, model = build_janus(words, seed, "real" if real_layout else "tiny")
    adapter.save_pretrained(path, model)
    return path


JANUS_WORDS = (
    "a an photo of red blue green yellow dog cat car cup two three four and left right above below the".split()
)


def _tiny_toy(folder: str):
    from gvu.toy.backend import ToyUMM

    return ToyUMM.new_model(seed=0, hidden_size=32, intermediate_size=64, num_hidden_layers=2)


def _tiny_janus(folder: str):
    path = make_tiny_janus(f"{folder}/janus", JANUS_WORDS + TEMPLATE_WORDS, seed=0)  # + the question templates' words
    return JanusUMM.from_pretrained(path)


# every registered backend needs an entry (tests/gvu/test_backends.py fails for one without)
TINY_BACKENDS = {"toy": _tiny_toy, "janus": _tiny_janus}
TINY_PROMPTS = {"toy": ["a photo of a red circle", "two blue stars"], "janus": ["a photo of a red dog", "two cats"]}
# (question, answer) pairs for answer_logprobs: caption prefixes (cloze) for the toy, free text with Ability.QUESTIONS
_FREE_QUESTIONS = [
    ("What color is the dog?", "red"), ("Is there a cat in the image?", "No"),
    ("Does the image show a photo of a red dog? Answer Yes or No.", "Yes"), ("", "two cats"),
]  # fmt: skip
TINY_QUESTIONS = {
    "toy": [("a photo of", "a red circle"), ("", "two blue stars"), ("a photo of a red", "circle"), ("a", "red")],
    "janus": _FREE_QUESTIONS,
    "xomni": _FREE_QUESTIONS,
}


XOMNI_WORDS = JANUS_WORDS + ["cats", "dogs"] + TEMPLATE_WORDS  # the 64 ids of the fixture, every one used
# the ids of tests/fixtures/xomni_tiny (its README): pad 0, digits 10-19, ' ' 20, code k 64 + k, <SOM> 96 ...
_XOMNI_LOW = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>", "\n", "user", "assistant", "system", ".", ","]
_CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_xomni_tokenizer(words: list[str], vocab_size: int = 64, num_codes: int = 32):
    """An offline PreTrainedTokenizerFast on the ids of tests/fixtures/xomni_tiny: ChatML tokens and template,
    digits and ' ' as single tokens (as Qwen2 splits them), `words` + the instruction's words below vocab_size,
    <MM-Token-k> = vocab_size + k, then <SOM> <EOM> <IMAGE>."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from gvu.models.xomni.backend import EOM, IMAGE, INSTRUCTION, SOM

    text = [w for w in dict.fromkeys(INSTRUCTION.replace(".", " ").split() + list(words)) if w not in _XOMNI_LOW]
    if 21 + len(text) > vocab_size:
        raise ValueError(f"{len(text)} words do not fit in the {vocab_size - 21} free text ids of the tiny X-Omni")
    pieces = _XOMNI_LOW + [str(d) for d in range(10)] + [" "] + text
    mm = [f"<MM-Token-{k}>" for k in range(num_codes)] + [SOM, EOM, IMAGE]
    vocab = {**{w: i for i, w in enumerate(pieces)}, **{t: vocab_size + i for i, t in enumerate(mm)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\p{L}+|\p{N}|\s|[^\s\p{L}\p{N}]"), behavior="isolated")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>", unk_token="<unk>", padding_side="left"
    )
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", *mm]})
    fast.chat_template = _CHATML
    return fast


def make_tiny_xomni(path: str, image_size: int = 64, words: list[str] = XOMNI_WORDS) -> str:
    """The fixture tests/fixtures/xomni_tiny (made by the released code) with tiny_xomni_tokenizer(words), as an
    X-Omni folder the backend loads (gvu_xomni.json: image_size px, 16 px a code)."""
    from pathlib import Path

    from gvu.models.xomni.backend import XOmniUMM
    from gvu.models.xomni.modeling import XOmniForCausalLM

    fixture = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "xomni_tiny"
    model = XOmniForCausalLM.from_pretrained(fixture).eval()
    c = model.config
    tok = tiny_xomni_tokenizer(words, c.vocab_size, c.image_vocab_size)
    XOmniUMM(tok, c, image_size=image_size).save_pretrained(path, model)
    return path


def _tiny_xomni(folder: str):
    from gvu.models.xomni.backend import XOmniUMM

    return XOmniUMM.from_pretrained(make_tiny_xomni(f"{folder}/xomni"))


TINY_BACKENDS["xomni"] = _tiny_xomni
TINY_PROMPTS["xomni"] = ["a photo of a red dog", "two cats"]


def tiny_backend(name: str, folder: str):
    """(backend, eval-mode model) of a tiny random model of backend `name`, built offline under `folder`."""
    backend, model = TINY_BACKENDS[name](folder)
    return backend, model.eval()


# ----------------------------------------------------------------------------------------------- trainer runs

REPO = __import__("pathlib").Path(__file__).resolve().parent.parent
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def tiny_toy_checkpoint(folder) -> str:
    """A random toy UMM (the shipped shapes, d=96) saved to `folder`: what the trainer tests train."""
    from gvu.toy.backend import ToyUMM

    backend, model = ToyUMM.new_model(seed=0)
    backend.save_pretrained(str(folder), model)
    return str(folder)


def small_run(ckpt, out, steps: int, *extra: str) -> list[str]:
    """Overrides of a short toy run: 4 prompts x 4 samples, no evaluation, a line and a checkpoint every step."""
    return [
        f"--model.path={ckpt}", f"--train.output_dir={out}", f"--train.steps={steps}", "--grpo.prompts_per_step=4",
        "--grpo.group_size=4", "--train.eval_before=false", "--train.eval_after=false", "--train.save_every=1",
        "--train.log_every=1", *extra,
    ]  # fmt: skip


def trainer_command(args: list[str], ranks: int = 1) -> list[str]:
    import socket
    import sys

    train = str(REPO / "gvu" / "train.py")
    if ranks == 1:
        return [sys.executable, train, *args]
    with socket.socket() as sock:  # a free port for the ranks' rendezvous (another job may hold 29500)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port", str(port),
            train, *args]  # fmt: skip


def trainer_env(**extra: str) -> dict:
    import os

    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    return {**env, "PYTHONPATH": str(REPO), **extra}


def run_trainer(args: list[str], cwd, ranks: int = 1, timeout: float = 600, **env):
    """gvu/train.py in a subprocess -> CompletedProcess (stdout, stderr, returncode); no check."""
    import subprocess

    return subprocess.run(
        trainer_command(args, ranks), cwd=cwd, env=trainer_env(**env), capture_output=True, text=True, timeout=timeout
    )


def read_metrics(run_dir) -> dict[int, dict]:
    """metrics.jsonl of a run -> {step: row}; a step logged twice raises (a resume must not duplicate rows)."""
    import json
    from pathlib import Path

    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [r["step"] for r in rows]
    if len(steps) != len(set(steps)):
        raise AssertionError(f"metrics.jsonl of {run_dir} holds a step twice: {steps}")
    return {r["step"]: r for r in rows}
