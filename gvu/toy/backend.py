"""The toy early-fusion UMM of the shapes world: text words and image codes in one vocabulary, one decoder.

Sequence layouts (an image is 6 rows of 6 codes, each row closed by <eor> as in Emu3; 42 tokens):
    generation     [bos] prompt [boi] row1 <eor> ... row6 <eor> [eoi]
    unconditional  [bos] [boi] row1 <eor> ... row6 <eor> [eoi]          (CFG's branch; prompt dropped ~10%)
    understanding  [bos] [boi] row1 <eor> ... row6 <eor> [eoi] [describe] prompt [eos]
Image tokens handed to and from the trainer are CODE indices 0..K-1 (K = 121) in raster order, without
<eor>; the backend inserts <eor>. In the vocabulary the codes are one contiguous block of ids, so the code rows
of lm_head are a view of its weight.

Every method that runs the network takes the module to run first (HF model, PeftModel or DeepSpeed engine);
`backbone_and_head` gives the decoder body (last hidden states) and the lm_head, which is applied only where
log-probs are needed, through kernels.linear_token_logprobs. Rows per forward: `model.max_rows`, else planned from
`model.memory_budget_gb` (gvu/models/rows.py). The contract is gvu/models/base.py.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from tokenizers import Tokenizer

import kernels
from gvu.config import resolve_path
from gvu.models import backbone_and_head, gathered, saveable, unwrap
from gvu.models.base import (
    Ability,
    PromptBatch,
    UnderstandingInputs,
    answer_rows,
    left_pad,
    question_rows,
    scored_mask,
    understanding_rows,
)
from gvu.models.rows import RowPlanner, read_config, shape_of_llama
from gvu.rollout import AffineProjection, HeadParts, SamplingConfig, cfg_combine, prompt_groups, sample_images
from gvu.toy import world as W
from gvu.toy.modeling import WORDS, FactorisedCodeRows, build_tokenizer, default_config

NOT_A_CHECKPOINT = "no tokenizer.json: not a toy UMM checkpoint (make one with `python -m gvu.toy.pretrain --out DIR`)"


class ToyUMM:
    """Layout of the toy UMM (tokenizer, sequence formats, renderer); holds no weights."""

    name = "toy"
    abilities = frozenset({Ability.CAPTION, Ability.END_TOKEN, Ability.IMAGE_HEAD_UPDATE})  # no QUESTIONS

    row = W.GRID
    image_len = W.IMAGE_LEN  # codes per image, without <eor>
    num_codes = W.NUM_CODES
    layout_len = W.GRID * (W.GRID + 1)  # codes + one <eor> per row
    image_size = W.GRID * W.CELL

    def __init__(self, tokenizer: Tokenizer | None = None):
        self.tokenizer = tokenizer or build_tokenizer()
        v = self.tokenizer.get_vocab()
        self.vocab_size = len(v)
        self.pad, self.unk, self.bos, self.eos = (v[t] for t in ("<pad>", "<unk>", "<bos>", "<eos>"))
        self.boi, self.eoi, self.eor, self.describe = (v[t] for t in ("<boi>", "<eoi>", "<eor>", "<describe>"))
        self.code_offset = v["<c0>"]
        if [v[f"<c{k}>"] for k in range(self.num_codes)] != list(
            range(self.code_offset, self.code_offset + self.num_codes)
        ):
            raise ValueError("tokenizer.json must hold the image codes <c0>..<c120> as one contiguous block of ids")
        self.word_ids = torch.tensor(sorted(v[w] for w in WORDS))
        # positions of the 36 codes inside the 42-token image layout
        self.code_slots = torch.tensor([r * (self.row + 1) + c for r in range(self.row) for c in range(self.row)])
        self.rows = RowPlanner(None)  # all rows at once until a model's config gives the sizes (new_model, load)

    @classmethod
    def _shape(cls, config):
        n = cls.layout_len
        return shape_of_llama(config, codes=cls.num_codes, head_width=config.hidden_size, image_tokens=n,
                              understanding_tokens=n)  # fmt: skip

    @classmethod
    def memory_shape(cls, cfg):
        from transformers import LlamaConfig

        return cls._shape(read_config(LlamaConfig, resolve_path(cfg.path)))

    # ---------------------------------------------------------------------------------------- building

    @classmethod
    def new_model(cls, seed: int = 0, **config_overrides):
        """(adapter, randomly initialised LlamaForCausalLM) for pretraining or tests."""
        from transformers import LlamaForCausalLM

        adapter = cls()
        torch.manual_seed(seed)
        model = LlamaForCausalLM(default_config(adapter.vocab_size, **config_overrides))
        adapter.rows = RowPlanner(cls._shape(model.config))
        return adapter, model

    @classmethod
    def check_config(cls, cfg) -> list[str]:
        path = resolve_path(cfg.path)
        if not path.is_dir():
            return [f"model.path={cfg.path!r}: no such folder (looked in the cwd and the repo)"]
        return [] if (path / "tokenizer.json").exists() else [f"model.path={cfg.path!r}: {NOT_A_CHECKPOINT}"]

    @classmethod
    def check_prompts(cls, cfg, texts: list[str]) -> list[str]:
        """The vocabulary is closed: every word must be one of WORDS."""
        known = set(WORDS)
        out = []
        for t in texts:
            bad = [w for w in t.split() if w not in known]
            if bad or not t.split():
                out.append(f"prompt {t!r}: words outside the toy vocabulary {bad or '(empty prompt)'}")
        return out

    @classmethod
    def load(cls, cfg):
        adapter, model = cls.from_pretrained(str(resolve_path(cfg.path)))
        adapter.rows.max_rows, adapter.rows.budget_gb = cfg.max_rows, cfg.memory_budget_gb
        return adapter, model.to(getattr(torch, cfg.dtype))

    @classmethod
    def from_pretrained(cls, path: str):
        """(adapter, model) from a directory written by `save_pretrained`."""
        from transformers import AutoModelForCausalLM

        tok_path = os.path.join(path, "tokenizer.json")
        if not os.path.exists(tok_path):
            raise FileNotFoundError(f"{path}: {NOT_A_CHECKPOINT}")
        adapter = cls(Tokenizer.from_file(tok_path))
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa")
        adapter.rows = RowPlanner(cls._shape(model.config))
        return adapter, model.eval()

    def save_pretrained(self, path: str, model) -> None:
        """config.json + model.safetensors (HF), tokenizer.json and world.json (layout) into `path`."""
        os.makedirs(path, exist_ok=True)
        unwrap(model).save_pretrained(path, safe_serialization=True)
        self.tokenizer.save(os.path.join(path, "tokenizer.json"))
        world = dict(grid=W.GRID, cell_px=W.CELL, num_codes=self.num_codes, code_offset=self.code_offset,
                     shapes=W.SHAPES, colors=W.COLORS, sizes=W.SIZES, layout={
                         "generation": "[bos] prompt [boi] (row <eor>) x6 [eoi]",
                         "understanding": "[bos] [boi] (row <eor>) x6 [eoi] [describe] prompt [eos]"})  # fmt: skip
        with open(os.path.join(path, "world.json"), "w") as f:
            json.dump(world, f, indent=1)

    def add_image_head_update(self, model) -> FactorisedCodeRows:
        """Register a trainable factorised update of lm_head's image-code rows on `model` (zero at the start).

        lm_head.weight then reads rows + S[shape] + C[colour] + Z[size] for the codes: generation-only
        parameters in which a colour learned on some shapes moves every shape's rows of that colour.
        """
        from torch.nn.utils import parametrize

        head = unwrap(model).get_output_embeddings()
        update = FactorisedCodeRows(self.code_offset, head.weight.shape[1], init=0.0, residual=True)
        update.to(dtype=head.weight.dtype, device=head.weight.device)
        parametrize.register_parametrization(head, "weight", update)
        return update

    # -------------------------------------------------------------------------------------- text, pixels

    def encode_text(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text).ids
        if self.unk in ids or not ids:
            bad = [w for w in text.split() if w not in WORDS]
            raise ValueError(f"prompt {text!r} has words outside the toy vocabulary: {bad}; known words: {WORDS}")
        return ids

    def tokenize_prompts(self, texts: list[str], device=None) -> PromptBatch:
        """Prompts -> PromptBatch: left-padded word ids (B, Lp) and generation prefixes [bos] (padded words) [boi]
        (B, Lp + 2)."""
        rows = [self.encode_text(t) for t in texts]
        ids, mask = left_pad(rows, self.pad)
        # [bos] then the left-padded words then [boi], as the shipped base was pretrained and its recorded runs made
        # (moving bos after the pads gives the same maths in another float summation order, and another trajectory)
        n = len(rows)
        gen_ids = torch.cat([torch.full((n, 1), self.bos), ids, torch.full((n, 1), self.boi)], 1)
        gen_mask = torch.cat([torch.ones((n, 1), dtype=torch.bool), mask, torch.ones((n, 1), dtype=torch.bool)], 1)
        batch = PromptBatch(ids, mask, list(texts), gen_ids, gen_mask)
        return batch.to(device) if device is not None else batch

    def decode(self, image_tokens: torch.Tensor) -> np.ndarray:
        """Codes (N, 36) -> uint8 pixels (N, 96, 96, 3)."""
        return W.render(torch.as_tensor(image_tokens).cpu().numpy())

    def encode(self, pixels) -> torch.Tensor:
        """uint8 pixels (N, 96, 96, 3) (numpy or tensor) -> codes int64 (N, 36); exact inverse of decode."""
        p = pixels.cpu().numpy() if torch.is_tensor(pixels) else np.asarray(pixels)
        return torch.from_numpy(W.read_image(p.reshape(-1, self.image_size, self.image_size, 3)))

    def image_layout(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (N, 36) -> token ids (N, 42): each row of codes followed by <eor>."""
        n = codes.shape[0]
        rows = codes.long().view(n, self.row, self.row) + self.code_offset
        eor = torch.full((n, self.row, 1), self.eor, dtype=torch.long, device=codes.device)
        return torch.cat([rows, eor], -1).view(n, self.layout_len)

    # ---------------------------------------------------------------------------------------- sequences

    def _prefix(self, prompts: PromptBatch, unconditional: bool = False):
        """Left-padded generation prefix [bos] prompt [boi]: ids (N, Lp+2), attention mask (N, Lp+2) long; the
        unconditional one is [bos][boi] left-padded to the same length, so both branches share one batch."""
        ids, mask = prompts.gen_ids, prompts.gen_mask.long()
        if unconditional:
            ids, mask = torch.full_like(ids, self.pad), torch.zeros_like(mask)
            ids[:, -2], ids[:, -1] = self.bos, self.boi
            mask[:, -2:] = 1
        return ids, mask

    @staticmethod
    def _positions(mask: torch.Tensor) -> torch.Tensor:
        return (mask.cumsum(-1) - 1).clamp_min(0)

    def _code_rows(self, head) -> torch.Tensor:
        """The lm_head rows of the image codes (K, D): a view, so gradients reach the head."""
        return head.weight[self.code_offset : self.code_offset + self.num_codes]

    # --------------------------------------------------------------------------------------- generation

    @torch.no_grad()
    def generate(self, model, prompts: PromptBatch, num_samples: int, sampling: SamplingConfig, generator=None):
        """Sample `num_samples` images per prompt -> codes int64 (B*G, 36); row b*G+g is sample g of prompt b.

        gvu.rollout.sample_images per chunk of rows: each prompt prefilled once for its samples, then one forward
        per code, except that a row's last code and its forced <eor> go in together (36 forwards). Sampling sees
        only the code logits (hidden @ code rows of lm_head); with cfg_scale > 1 unconditional rows [bos][boi] run
        in the same batch and the logits are combined before temperature / top-k / top-p / min-p.
        """
        B, G, cfg = len(prompts), num_samples, sampling.cfg_scale > 1
        P = prompts.gen_ids.shape[1]
        step = self.rows.chunk("rollout", B * G, cfg, model, P + self.layout_len, prefix_len=P)
        chunks = prompt_groups(B, G, step)
        return torch.cat([self._generate_rows(model, prompts[i.tolist()], c, sampling, generator) for i, c in chunks])

    def _generate_rows(self, model, p: PromptBatch, counts, sampling: SamplingConfig, generator) -> torch.Tensor:
        """counts[i] images of prompt row i -> codes (sum(counts), 36): gvu.rollout.sample_images on the toy's
        layout (a row's last code goes in with its forced <eor>; logits = hidden @ the code rows of lm_head)."""
        body, head = backbone_and_head(model)
        ids, mask = self._prefix(p)
        u_ids, u_mask = self._prefix(p, unconditional=True)
        eor = torch.full((int(counts.sum()), 1), self.eor, device=ids.device)  # feed sees the conditional rows

        def width(t: int) -> int:  # a row's last code goes in with its forced <eor>
            return 2 if (t + 1) % self.row == 0 else 1

        def feed(tok: torch.Tensor, t: int) -> dict:
            codes = (tok + self.code_offset).unsqueeze(1)
            return {"input_ids": torch.cat([codes, eor], 1) if width(t) == 2 else codes}

        with gathered(head.weight):
            wc = self._code_rows(head)
            bc = head.bias[self.code_offset : self.code_offset + self.num_codes] if head.bias is not None else None
            return sample_images(
                body,
                {"input_ids": ids},
                mask,
                counts,
                steps=self.image_len,
                fed_len=self.layout_len,
                feed=feed,
                width=width,
                logits=lambda h: torch.nn.functional.linear(h, wc, bc),
                sampling=sampling,
                generator=generator,
                uncond=({"input_ids": u_ids}, u_mask) if sampling.cfg_scale > 1 else None,
                head=HeadParts(lambda h: h, AffineProjection(wc, bc)),  # the head is one Linear: CFG on h
            )

    def _image_hidden(self, model, prompts: PromptBatch, image_tokens: torch.Tensor, with_uncond: bool):
        """Teacher-forced hidden states that predict each code: (N, 36, D), or (2N, 36, D) with the
        unconditional rows ([bos][boi] left-padded to the same length) after the conditional ones."""
        body, _ = backbone_and_head(model)
        ids, mask = self._prefix(prompts)
        if with_uncond:
            u_ids, u_mask = self._prefix(prompts, unconditional=True)
            ids, mask = torch.cat([ids, u_ids]), torch.cat([mask, u_mask])
            image_tokens = torch.cat([image_tokens, image_tokens])
        P = ids.shape[1]
        ids = torch.cat([ids, self.image_layout(image_tokens)], 1)
        mask = torch.cat([mask, torch.ones((ids.shape[0], self.layout_len), dtype=torch.long, device=ids.device)], 1)
        h = body(input_ids=ids, attention_mask=mask, position_ids=self._positions(mask)).last_hidden_state
        return h[:, P - 1 + self.code_slots.to(h.device)]  # the state before each code predicts it

    def image_logprobs(
        self, model, prompts: PromptBatch, image_tokens: torch.Tensor, *, temperature=1.0, cfg_scale=1.0
    ):
        """log p(code_t | prompt, codes_<t) of the distribution rollout samples from -> fp32 (B*G, 36), with grad.

        prompts: B rows; image_tokens: (B*G, 36) codes, G consecutive samples per prompt. The softmax is over the
        K codes only (as in `generate`), at `temperature`. Without CFG the code rows of lm_head go to
        kernels.linear_token_logprobs. With cfg_scale > 1 the unconditional rows run in the same pass; the
        combination needs both branches' logits, so the K code logits are formed explicitly (K = 121, small:
        (2N*36, 121) fp32) and scored by kernels.token_logprobs.
        """
        n = image_tokens.shape[0]
        if n % len(prompts):
            raise ValueError(f"image_tokens has {n} rows, not a multiple of the {len(prompts)} prompts")
        p, targets = prompts.repeat_interleave(n // len(prompts)), image_tokens.long()
        step = self.rows.chunk("score", n, cfg_scale > 1, model, p.gen_ids.shape[1] + self.layout_len)
        return torch.cat(
            [self._image_logprobs_rows(model, p[s : s + step], targets[s : s + step], temperature, cfg_scale)
             for s in range(0, n, step)]
        )  # fmt: skip

    def _image_logprobs_rows(self, model, p: PromptBatch, targets, temperature, cfg_scale) -> torch.Tensor:
        _, head = backbone_and_head(model)
        n, cfg = len(p), cfg_scale > 1
        h = self._image_hidden(model, p, targets, with_uncond=cfg)
        bias = head.bias[self.code_offset : self.code_offset + self.num_codes] if head.bias is not None else None
        with gathered(head.weight):
            wc = saveable(self._code_rows(head))  # kept for backward: must outlive the ZeRO-3 gather
            if not cfg:
                lp = kernels.linear_token_logprobs(
                    h.reshape(-1, h.shape[-1]), wc, targets.reshape(-1), bias=bias, temperature=temperature
                )
                return lp.view(n, self.image_len)
            logits = torch.nn.functional.linear(h, wc, bias).float()
        logits = cfg_combine(logits[:n], logits[n:], cfg_scale)
        return kernels.token_logprobs(logits, targets, temperature=temperature)

    # ------------------------------------------------------------------------------------ understanding

    def _understanding_prefix(self, codes: torch.Tensor) -> torch.Tensor:
        """[bos][boi] image [eoi][describe]: (N, 46)."""
        n, dev = codes.shape[0], codes.device

        def col(t):
            return torch.full((n, 1), t, dtype=torch.long, device=dev)

        return torch.cat([col(self.bos), col(self.boi), self.image_layout(codes), col(self.eoi), col(self.describe)], 1)

    def prompt_logprobs(self, model, images, prompts: PromptBatch, *, with_eos: bool = False):
        """log p(prompt_j | instruction, image, prompt_<j) -> (logp fp32 (N, Lp), mask bool (N, Lp)), aligned with
        prompts.ids (left-padded); padded entries are 0.

        images: uint8 (N, 96, 96, 3) pixels, read back to codes. ONE teacher-forced pass of the right-padded
        understanding sequences (so a row's values do not depend on its batch); the lm_head runs only at the
        states that predict prompt words, over the full vocabulary. With `with_eos`, one more column (N, Lp + 1)
        holds log p(<eos> | ..., prompt): how sure the understanding is that the prompt describes the WHOLE image
        (an image with objects the prompt does not name makes the caption go on instead of ending).
        """
        dev = prompts.ids.device
        codes = self.encode(images).to(dev)
        if codes.shape[0] != len(prompts):
            raise ValueError(f"{codes.shape[0]} images but {len(prompts)} prompts; pass one prompt per image")
        n = len(prompts)
        step = self.rows.chunk("score", n, False, model, self.layout_len + 5 + prompts.ids.shape[1])
        logp = torch.cat(
            [self._prompt_logprobs_rows(model, codes[s : s + step], prompts[s : s + step], with_eos)
             for s in range(0, n, step)]
        )  # fmt: skip
        return logp, scored_mask(prompts, with_eos)

    def _prompt_logprobs_rows(self, model, codes, prompts: PromptBatch, with_eos: bool, scored=None) -> torch.Tensor:
        body, head = backbone_and_head(model)
        end = self.eos if with_eos else None
        a = answer_rows(self._understanding_prefix(codes), prompts, self.pad, end, scored)
        h = body(input_ids=a.seq).last_hidden_state
        with gathered(head.weight):
            lp = kernels.linear_token_logprobs(h[a.rows, a.pos], head.weight, a.targets, bias=head.bias)
        return a.scatter(lp)

    def answer_logprobs(self, model, images, questions: list[str], answers: list[str]):
        """log p(answer_j | image, question, answer_<j) -> (logp fp32 (N, La), mask bool (N, La)), answers left-padded.
        Pretrained on captions only (no Ability.QUESTIONS), the toy reads a question as a caption prefix after
        [describe] ("a photo of"; "" none), the answer as the words that follow: a cloze, in prompt_logprobs' pass."""
        dev = next(unwrap(model).parameters()).device
        q = question_rows(
            [self.encode_text(t) if t.split() else [] for t in questions], self.tokenize_prompts(answers, dev), self.pad
        )
        codes = self.encode(images).to(dev)
        if codes.shape[0] != len(q):
            raise ValueError(f"{codes.shape[0]} images but {len(q)} questions; pass one question per image")
        step = self.rows.chunk("score", len(q), False, model, self.layout_len + 4 + q.ids.shape[1])
        rows = [self._prompt_logprobs_rows(model, codes[s : s + step], q[s : s + step], False, q.scored[s : s + step])
                for s in range(0, len(q), step)]  # fmt: skip
        return q.answers(torch.cat(rows))

    def understanding_inputs(self, images, prompts: PromptBatch, *, question: str | None = None) -> UnderstandingInputs:
        """[bos][boi] image [eoi][describe] (question) prompt, right-padded, for `model(input_ids=...)`."""
        prefix = self._understanding_prefix(self.encode(images))
        q = torch.tensor(self.encode_text(question) if question and question.split() else [], dtype=torch.long)
        return understanding_rows(torch.cat([prefix, q.expand(prefix.shape[0], -1)], 1), prompts, self.pad)

    def caption(self, model, images, greedy: bool = True, max_words: int = 16, generator=None) -> list[str]:
        """Understanding writing a prompt for each image: uint8 (N, 96, 96, 3) -> N strings (gvu/toy/caption.py)."""
        from gvu.toy.caption import caption

        return caption(self, model, images, greedy, max_words, generator)
