"""X-Omni (gvu.models.xomni.XOmniForCausalLM) behind the backend contract of gvu/models/base.py; docs/xomni.md.

Sequence layouts, tokenizer-encoded as the released GRPO trainer and reward do (H x W codes, code k = id V + k):
    generation     prompt "<SOM>{H} {W}<IMAGE>" c_1 ... c_HW                  (raw prompt, no chat template)
    unconditional  "<SOM>{H} {W}<IMAGE>" c_1 ...  left-padded to the same length, in the same batch (the negative
                   prompt of transformers' UnbatchedClassifierFreeGuidanceLogitsProcessor, which the released
                   path runs as a second model call per step)
    understanding  chat_template(user: "<SOM>{H} {W}<IMAGE>" c_1 ... c_HW "<EOM>\\n" instruction, generation prompt)
                   prompt [<|im_end|>]        (text mode; only the prompt's tokens, and with_eos the end, scored)
Image mode = logits of mm_head's first K rows (model.image_head_weight); text mode = lm_head. Neither full-width
logits tensor is built: rollout forms the (n, K) code logits, scoring goes through kernels.linear_token_logprobs.

CFG: the released processor mixes s (log_softmax(z_c) - log_softmax(z_u)) + log_softmax(z_u), which differs from
z_u + s (z_c - z_u) by a per-row constant, so both give the same distribution; rollout uses the former (closest to
transformers' numbers), image_logprobs the latter on the body's last features (mm_head has no bias: CFG on logits
== CFG on features), as gvu/models/janus.py explains for Janus.

Reward paths (docs/xomni.md, "Reward paths"; `reward_path` in the folder's gvu_xomni.json, options.py):
- "pixels", the paper's: decode = SigLIP-VQ features -> FLUX decoder -> pixels (decoder.py, needs diffusers), and
  prompt_logprobs tokenizes those pixels with SigLIP-VQ (vision.py) before the understanding turn.
- "tokens" (default), an approximation: the understanding turn reads the generated codes themselves (the code space
  generation wrote them in); decode returns a lossless rendering of the codes (codes.py), read back exactly.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
import torch.nn.functional as F

import kernels
from gvu.models.base import (
    Ability,
    PromptBatch,
    UnderstandingInputs,
    answer_rows,
    left_pad,
    load_options,
    question_rows,
    scored_mask,
    understanding_rows,
)
from gvu.models.rows import RowPlanner, read_config, shape_of_llama
from gvu.models.wrapping import gathered, saveable, unwrap
from gvu.models.xomni.codes import PATCH, TokenCodec
from gvu.models.xomni.modeling import position_ids_from_mask
from gvu.models.xomni.options import OPTIONS_FILE, folder_problems, read_options
from gvu.rollout import SamplingConfig, cfg_combine, prompt_groups, sample_images

INSTRUCTION = "Describe the image in detail."  # the official GvU reward's user text
SOM, EOM, IMAGE, END = "<SOM>", "<EOM>", "<IMAGE>", "<|im_end|>"


class XOmniUMM:
    """Layout of an X-Omni UMM (tokenizer, sequence formats, code grid); holds no weights."""

    name = "xomni"
    abilities = frozenset({Ability.END_TOKEN, Ability.LORA_NARROWING, Ability.QUESTIONS})

    def __init__(
        self,
        tokenizer,
        config,
        *,
        image_size=576,
        instruction=INSTRUCTION,
        max_rows=0,
        codec=None,
        reward_path="tokens",
        memory_budget_gb=0.0,
    ):
        self.tokenizer, self.config, self.instruction = tokenizer, config, instruction
        self.rows = RowPlanner(self._shape(config, image_size), max_rows, memory_budget_gb)
        self.hw = (image_size // PATCH, image_size // PATCH)
        self.image_len, self.num_codes = self.hw[0] * self.hw[1], config.image_vocab_size
        self.reward_path = reward_path
        # how codes become images and back: TokenCodec (reward_path tokens) or decoder.PixelCodec (pixels)
        self.codec = codec or TokenCodec(self.hw, self.num_codes)
        self.offset = config.vocab_size  # id of code 0

        def tid(tok: str) -> int:
            i = tokenizer.convert_tokens_to_ids(tok)
            if i is None or (i == tokenizer.unk_token_id and tok != tokenizer.unk_token):
                raise ValueError(f"the tokenizer has no {tok!r} token: not an X-Omni tokenizer (docs/xomni.md)")
            return i

        self.som, self.eom, self.image, self.end = tid(SOM), tid(EOM), tid(IMAGE), tid(END)
        for k in (0, self.num_codes - 1):  # understanding reads codes as the ids generation writes them with
            if tid(f"<MM-Token-{k}>") != self.offset + k:
                raise ValueError(
                    f"<MM-Token-{k}> is not id vocab_size + {k} = {self.offset + k}: tokenizer and model differ"
                )
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else config.pad_token_id
        self.image_prefix = f"{SOM}{self.hw[0]} {self.hw[1]}{IMAGE}"
        # the unconditional (CFG) branch's prefix: the image header alone, as the released negative_prompt_ids
        self.uncond_prefix = self._tok(self.image_prefix)
        self._und = {}
        self._und_parts(self.hw)

    def _und_parts(self, hw: tuple[int, int], question: str | None = None) -> tuple[list[int], list[int]]:
        """The understanding turn's ids before and after the codes of an H x W image, the user text `question`
        (default: the instruction, cached per grid)."""
        if question is not None or hw not in self._und:
            text = self.instruction if question is None else question
            chat = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": f"{SOM}{hw[0]} {hw[1]}{IMAGE}{EOM}\n{text}"}],
                add_generation_prompt=True,
                tokenize=False,
            )
            ids = self._tok(chat)
            if ids.count(self.image) != 1:
                raise ValueError(f"the chat template's user turn holds {ids.count(self.image)} {IMAGE} tokens, not 1")
            cut = ids.index(self.image) + 1
            if question is not None:
                return ids[:cut], ids[cut:]
            self._und[hw] = ids[:cut], ids[cut:]  # the codes go between <IMAGE> and <EOM>
        return self._und[hw]

    def _tok(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    max_rows = property(lambda self: self.rows.max_rows, lambda self, k: setattr(self.rows, "max_rows", k))

    @staticmethod
    def _shape(config, image_size: int):
        n = (image_size // PATCH) ** 2  # the understanding turn reads the same grid of codes (both reward paths)
        return shape_of_llama(config, codes=config.image_vocab_size, head_width=config.hidden_size, image_tokens=n,
                              understanding_tokens=n)  # fmt: skip

    @classmethod
    def memory_shape(cls, cfg):
        from gvu.config import resolve_path
        from gvu.models.xomni.configuration import XOmniConfig

        path = str(resolve_path(cfg.path))
        return cls._shape(read_config(XOmniConfig, path), read_options(path)[0]["image_size"])

    # ---------------------------------------------------------------------------------------- building

    @classmethod
    def check_config(cls, cfg) -> list[str]:
        from gvu.config import resolve_path

        return [f"model.path={cfg.path!r}: {p}" for p in folder_problems(str(resolve_path(cfg.path)))]

    @classmethod
    def check_prompts(cls, cfg, texts: list[str]) -> list[str]:
        out = [
            f"prompt {i}: empty; every prompt needs at least one token" for i, t in enumerate(texts) if not t.strip()
        ]
        mm = (SOM, EOM, IMAGE, "<MM-Token-")
        return out + [f"prompt {t!r} holds an X-Omni image token" for t in texts if any(m in t for m in mm)]

    @classmethod
    def load(cls, cfg):
        from gvu.config import ConfigError, resolve_path

        path = str(resolve_path(cfg.path))
        problems = folder_problems(path)
        if problems:
            raise ConfigError([f"model.path={cfg.path!r}: {p}" for p in problems])
        return cls.from_pretrained(path, **load_options(cfg))

    @classmethod
    def from_pretrained(cls, path: str, *, dtype=torch.float32, attn_implementation: str = "sdpa", **kw):
        """(backend, XOmniForCausalLM in eval mode, text generation mode) from a released X-Omni folder; keyword
        options (image_size) override gvu_xomni.json."""
        from transformers import AutoTokenizer

        from gvu.models.xomni.modeling import XOmniForCausalLM

        problems = folder_problems(path)
        if problems:
            raise ValueError(f"{path}: {'; '.join(problems)}")
        model = XOmniForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation).eval()
        opts = read_options(path)[0]
        kw.setdefault("image_size", opts["image_size"])
        kw.setdefault("reward_path", opts["reward_path"])
        if kw["reward_path"] == "pixels" and "codec" not in kw:
            from gvu.models.xomni.decoder import PixelCodec

            hw = (kw["image_size"] // PATCH,) * 2
            kw["codec"] = PixelCodec.from_folder(path, opts["flux_path"], hw, opts["decode_seed"], dtype)
        return cls(AutoTokenizer.from_pretrained(path), model.config, **kw), model

    def save_pretrained(self, path: str, model) -> None:
        """Model (the released key names), tokenizer and gvu_xomni.json into `path`."""
        os.makedirs(path, exist_ok=True)
        unwrap(model).save_pretrained(path, safe_serialization=True)
        self.tokenizer.save_pretrained(path)
        with open(os.path.join(path, OPTIONS_FILE), "w") as f:
            json.dump({"image_size": self.hw[0] * PATCH, "reward_path": self.reward_path}, f, indent=1)

    def lora_targets(self, names: list[str]) -> str:
        """peft target_modules regex: `names` in the decoder layers only (adapter and head layers included, as the
        released run); never lm_head / mm_head (the kernels read their weights) nor the embeddings."""
        return r".*model\.layers\.\d+\..*\.(" + "|".join(map(str, names)) + r")"

    # -------------------------------------------------------------------------------------- text, pixels

    def tokenize_prompts(self, texts: list[str], device=None) -> PromptBatch:
        """Prompts -> PromptBatch: prompt tokens (B, Lp) and generation prefixes prompt + image prefix (B, Pg)."""
        answers, prefixes = [], []
        for t in texts:
            ids = self._tok(t)
            unk = self.tokenizer.unk_token_id
            if not ids or (unk is not None and unk in ids):
                raise ValueError(f"prompt {t!r}: empty, or words the tokenizer does not know")
            answers.append(ids)
            prefixes.append(self._tok(t + self.image_prefix))
        ids, mask = left_pad(answers, self.pad)
        gen_ids, gen_mask = left_pad(prefixes, self.pad)
        batch = PromptBatch(ids, mask, list(texts), gen_ids, gen_mask)
        return batch.to(device) if device is not None else batch

    def decode(self, image_tokens: torch.Tensor, texts: list[str] | None = None) -> np.ndarray:
        """Codes (N, H*W) -> uint8 (N, 16H, 16W, 3), per chunk of max_rows: reward_path tokens renders the codes
        (codes.py); pixels runs X-Omni's decoder, on `texts` (the paper's) or, as the trainer calls it, on the empty
        prompt (docs/xomni.md, "Reward paths")."""
        tokens = torch.as_tensor(image_tokens).long()
        n = tokens.shape[0]
        # max_rows images (0: all) at a time; the pixel decoder runs 2 rows an image (true CFG)
        step = max(1, self.max_rows // (1 + (self.reward_path == "pixels"))) if self.max_rows else max(n, 1)
        parts = [
            self.codec.decode(tokens[s : s + step], None if texts is None else texts[s : s + step])
            for s in range(0, n, step)
        ]
        return np.concatenate(parts)

    def _cfg_rows(self, ids: torch.Tensor, mask: torch.Tensor, cfg: bool):
        """Generation prefixes (n, P) -> (n or 2n, P) ids and long mask; unconditional rows (the image prefix alone,
        left-padded) after the conditional ones."""
        mask = mask.long()
        if not cfg:
            return ids, mask
        k = len(self.uncond_prefix)
        u_ids, u_mask = torch.full_like(ids, self.pad), torch.zeros_like(mask)
        u_ids[:, -k:] = torch.tensor(self.uncond_prefix, device=ids.device)
        u_mask[:, -k:] = 1
        return torch.cat([ids, u_ids]), torch.cat([mask, u_mask])

    # --------------------------------------------------------------------------------------- generation

    @torch.no_grad()
    def generate(self, model, prompts: PromptBatch, num_samples: int, sampling: SamplingConfig, generator=None):
        """Sample `num_samples` images per prompt -> codes int64 (B*G, H*W); row b*G+g is sample g of prompt b.

        gvu.rollout.sample_images per chunk of max_rows rows: each prompt prefilled once (with its unconditional row
        at cfg_scale > 1) for its samples, then one forward per code. Each step forms only the K code logits;
        greedy equals XOmniForCausalLM.generate in image mode (with negative_prompt_ids = the image prefix).
        """
        B, G, cfg = len(prompts), num_samples, sampling.cfg_scale > 1
        P = prompts.gen_ids.shape[1]
        step = self.rows.chunk("rollout", B * G, cfg, model, P + self.image_len, prefix_len=P)
        chunks = prompt_groups(B, G, step)
        return torch.cat([self._generate_rows(model, prompts[i.tolist()], c, sampling, generator) for i, c in chunks])

    def _generate_rows(self, model, p: PromptBatch, counts, sampling: SamplingConfig, generator):
        """counts[i] images of prompt row i -> codes (sum(counts), H*W): gvu.rollout.sample_images in image mode
        (codes fed as token ids at `offset`; logits = the first K rows of mm_head; CFG on log-probabilities)."""
        lm = unwrap(model)
        u, cfg = len(p), sampling.cfg_scale > 1
        ids, mask = self._cfg_rows(p.gen_ids, p.gen_mask, cfg)
        with gathered(lm.mm_head.weight):
            w = lm.mm_head.weight[: self.num_codes]
            return sample_images(
                lm.model,
                {"input_ids": ids[:u]},
                mask[:u],
                counts,
                steps=self.image_len,
                fed_len=self.image_len - 1,
                feed=lambda tok, t: {"input_ids": (tok + self.offset)[:, None]},
                logits=lambda h: F.linear(h, w),  # (rows, K): the image-mode part of the released logits
                sampling=sampling,
                generator=generator,
                uncond=({"input_ids": ids[u:]}, mask[u:]) if cfg else None,
                cfg_space="logprobs",
            )

    def image_logprobs(
        self, model, prompts: PromptBatch, image_tokens: torch.Tensor, *, temperature=1.0, cfg_scale=1.0
    ):
        """log p(code_t | prompt, codes_<t) -> fp32 (B*G, H*W) with grad, at `temperature`; cfg_scale > 1 scores the
        CFG-combined distribution rollout sampled from (module docstring), 1 the conditional branch.

        prompts: B rows; image_tokens: (B*G, H*W), G consecutive samples per prompt. One teacher-forced pass per
        chunk of max_rows rows, positions counted from the attention mask as in rollout.
        """
        n = image_tokens.shape[0]
        if n % len(prompts):
            raise ValueError(f"image_tokens has {n} rows, not a multiple of the {len(prompts)} prompts")
        p = prompts.repeat_interleave(n // len(prompts))
        targets = image_tokens.long()
        step = self.rows.chunk("score", n, cfg_scale > 1, model, p.gen_ids.shape[1] + self.image_len)
        return torch.cat(
            [
                self._image_logprobs_rows(model, p[s : s + step], targets[s : s + step], temperature, cfg_scale)
                for s in range(0, n, step)
            ]
        )

    def _image_logprobs_rows(self, model, p: PromptBatch, targets, temperature, cfg_scale):
        lm = unwrap(model)
        n, cfg = targets.shape[0], cfg_scale > 1
        ids, mask = self._cfg_rows(p.gen_ids, p.gen_mask, cfg)
        codes = torch.cat([targets, targets]) if cfg else targets
        P = ids.shape[1]
        # the last code is only predicted, never fed: L-1 code inputs give the L states that predict the codes
        seq = torch.cat([ids, codes[:, :-1] + self.offset], 1)
        mask = torch.cat([mask, torch.ones_like(codes[:, :-1])], 1)
        h = lm.model(input_ids=seq, attention_mask=mask, position_ids=position_ids_from_mask(mask))
        h = h.last_hidden_state[:, P - 1 :]
        if cfg:  # fp32 against cancellation in z_c - z_u
            h = cfg_combine(h[:n].float(), h[n:].float(), cfg_scale)
        with gathered(lm.mm_head.weight):
            w = saveable(lm.mm_head.weight[: self.num_codes])  # kept for backward: must outlive the ZeRO-3 gather
            lp = kernels.linear_token_logprobs(
                h.to(w.dtype).reshape(-1, h.shape[-1]), w, targets.reshape(-1), temperature=temperature
            )
        return lp.view(n, self.image_len)

    # ------------------------------------------------------------------------------------ understanding

    def understanding_prefix(self, codes: torch.Tensor, hw=None, question: str | None = None) -> torch.Tensor:
        """Codes (N, h*w) of an h x w grid (default: the generation grid) -> the understanding turn up to the
        generation prompt, int64 (N, P); `question`: the user text in place of the instruction."""
        n, dev = codes.shape[0], codes.device
        head, tail = self._und_parts(hw or self.hw, question)
        head = torch.tensor(head, device=dev).expand(n, -1)
        tail = torch.tensor(tail, device=dev).expand(n, -1)
        return torch.cat([head, codes.long() + self.offset, tail], 1)

    def prompt_logprobs(self, model, images, prompts: PromptBatch, *, with_eos: bool = False):
        """log p(prompt_j | instruction, image, prompt_<j) -> (logp fp32 (N, Lp), mask bool (N, Lp)) aligned with
        prompts.ids (left-padded, padded entries 0); `with_eos` adds the <|im_end|> column (N, Lp + 1).

        images: decode's output, back to codes through the codec (tokens: read exactly; pixels: the SigLIP-VQ
        tokenizer). ONE teacher-forced text-mode pass per chunk of max_rows right-padded rows; lm_head only at the
        states that predict scored tokens, through kernels.linear_token_logprobs.
        """
        n, dev = len(prompts), prompts.ids.device
        codes, hw = self.codec.encode(images)
        codes = codes.to(dev)
        if codes.shape[0] != n:
            raise ValueError(f"{codes.shape[0]} images but {n} prompts; pass one prompt per image")
        head, tail = self._und_parts(hw)
        step = self.rows.chunk("score", n, False, model, len(head) + codes.shape[1] + len(tail) + prompts.ids.shape[1])
        end, prefix = self.end if with_eos else None, self.understanding_prefix(codes, hw)
        parts = [self._prompt_logprobs_rows(model, prefix[s : s + step], prompts[s : s + step], end)
                 for s in range(0, n, step)]  # fmt: skip
        return torch.cat(parts), scored_mask(prompts, with_eos)

    def answer_logprobs(self, model, images, questions: list[str], answers: list[str]):
        """log p(answer_j | image, question, answer_<j) -> (logp fp32 (N, La), mask bool (N, La)), answers left-padded:
        the ChatML user turn with the question in place of the instruction, the answer the assistant's; the rows
        and the one text-mode pass are prompt_logprobs', each question's tail in its row (not scored)."""
        codes, hw = self.codec.encode(images)
        head, dev = self._und_parts(hw)[0], next(unwrap(model).parameters()).device
        turns = [self._und_parts(hw, t) for t in questions]
        if any(h != head for h, _ in turns):
            raise ValueError("the chat template's turn before the image depends on the question; it must not")
        q = question_rows([t for _, t in turns], self.tokenize_prompts(answers, dev), self.pad)
        prefix = torch.cat([torch.tensor(head, device=dev).expand(len(q), -1), codes.to(dev).long() + self.offset], 1)
        step = self.rows.chunk("score", len(q), False, model, prefix.shape[1] + q.ids.shape[1])
        rows = [self._prompt_logprobs_rows(model, prefix[sl], q[sl], None, q.scored[sl])
                for sl in (slice(s, s + step) for s in range(0, len(q), step))]  # fmt: skip
        return q.answers(torch.cat(rows))

    def _prompt_logprobs_rows(self, model, prefix, prompts, end: int | None, scored=None) -> torch.Tensor:
        lm = unwrap(model)
        a = answer_rows(prefix, prompts, self.pad, end, scored)
        h = lm.model(input_ids=a.seq).last_hidden_state
        with gathered(lm.lm_head.weight):
            return a.scatter(kernels.linear_token_logprobs(h[a.rows, a.pos], lm.lm_head.weight, a.targets))

    def understanding_inputs(self, images, prompts: PromptBatch, *, question: str | None = None) -> UnderstandingInputs:
        """The understanding turn (with `question` as the user text) then the prompt, right-padded, for
        `model(input_ids=...)` in text mode."""
        codes, hw = self.codec.encode(images)
        return understanding_rows(self.understanding_prefix(codes.cpu(), hw, question), prompts, self.pad)
