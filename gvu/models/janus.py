"""Janus-Pro (transformers.JanusForConditionalGeneration) behind the backend contract (gvu/models/base.py).

Sequence layouts (Janus-Pro's "deepseek" chat format; the tokenizer adds nothing, the backend writes bos):
    generation     [bos] "<|User|>: {prompt}\\n\\n<|Assistant|>:" [boi] img_1 ... img_L          (L = 576)
    unconditional  the same row with every token except [bos] and [boi] replaced by [pad], same attention mask
                   (Janus's CFG branch; padded positions stay attended, as in Janus and HF generate)
    understanding  [bos] "<|User|>: " [boi] [image_placeholder] x 576 [eoi] "\\n{instruction}\\n\\n<|Assistant|>:"
                   " {prompt}"            (the prompt is the assistant's answer; only its tokens are scored)
Image tokens handed to and from the trainer are VQ codebook ids (N, L) in raster order. Generated tokens enter
the language model through the generation embeddings + aligner; the generation head (Linear -> GELU -> Linear
over the K = 16384 codes) predicts them. Understanding reads pixels: VQ decoder -> uint8 -> resize / pad /
normalise as JanusImageProcessor does (in torch, batched) -> SigLIP + aligner at the placeholder positions.

`image_logprobs` scores the CFG-combined distribution rollout sampled from (grpo.logprob_mode=rollout, on-policy)
or the conditional branch (conditional); why the default is on-policy: docs/DESIGN.md, "Which distribution".
The CFG logits are linear in the head's last features a = GELU(proj_out(h)), so the combination is formed on
the (N*L, 2048) features in fp32 and the K code logits are never materialised.

Every method that runs the network takes the module to run first (HF model, PeftModel or DeepSpeed engine).
Rows per forward in rollout and scoring: `max_rows` when set, else planned from `memory_budget_gb` (models/rows.py).
"""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import torch

import kernels
from gvu.config import ConfigError
from gvu.models.base import (
    Ability,
    PromptBatch,
    UnderstandingInputs,
    answer_rows,
    left_pad,
    load_options,
    question_rows,
    understanding_rows,
)
from gvu.models.hub import local_checkpoint
from gvu.models.janus_pixels import IMAGE_PROCESSING, JanusPixels
from gvu.models.rows import RowPlanner, read_config, shape_of_llama
from gvu.models.wrapping import gathered, partitioned, saveable, unwrap
from gvu.rollout import AffineProjection, HeadParts, SamplingConfig, cfg_combine, prompt_groups, sample_images

INSTRUCTION = "Describe the image in detail."  # the official GvU reward's user text
BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
IMAGE, BOI, EOI = "<image_placeholder>", "<begin_of_image>", "<end_of_image>"


def _folder_problem(path: str) -> str | None:
    """Why `path` is not an HF-format Janus checkpoint folder, or None."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        return f"{cfg_path} missing: not a Janus checkpoint folder"
    model_type = json.loads(open(cfg_path).read()).get("model_type")
    if model_type != "janus":
        return (
            f"model_type={model_type!r}, not 'janus'. The original deepseek-ai/Janus-Pro-* repos use remote code; "
            "use the transformers conversions deepseek-community/Janus-Pro-1B / -7B"
        )
    return None


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


class JanusUMM:
    """Layout of a Janus-Pro UMM (tokenizer, chat format, image processing, a frozen VQ decoder); no LM weights."""

    name = "janus"
    abilities = frozenset({Ability.LORA_NARROWING, Ability.QUESTIONS})
    user, assistant = "<|User|>:", "\n\n<|Assistant|>:"

    def __init__(
        self,
        tokenizer,
        config,
        vq: torch.nn.Module,
        generation_config=None,
        image_processing: dict | None = None,
        instruction: str = INSTRUCTION,
        system_prompt: str = "",
        max_rows: int = 0,
        memory_budget_gb: float = 0.0,
    ):
        self.tokenizer, self.config, self.instruction = tokenizer, config, instruction
        self.system_prompt = system_prompt
        # a private copy of the VQ model: `decode` takes no model, and under ZeRO-3 the engine's copy is partitioned
        self.pixels = JanusPixels(vq, image_processing)
        self.vq, self.image_size, self.image_processing = self.pixels.vq, self.pixels.image_size, self.pixels.settings

        def tid(tok: str) -> int:
            i = tokenizer.convert_tokens_to_ids(tok)
            if i is None or i == tokenizer.unk_token_id:
                raise ValueError(f"the tokenizer has no {tok!r} token: not a Janus-Pro tokenizer (README, Janus-Pro)")
            return i

        gk = getattr(generation_config, "generation_kwargs", None) or {}
        # the ids HF generate uses (generation_config), else the tokenizer's
        self.bos = getattr(generation_config, "bos_token_id", None) or tokenizer.bos_token_id
        self.pad = getattr(generation_config, "pad_token_id", None)
        self.pad = self.pad if self.pad is not None else tid(PAD)
        self.boi = gk.get("boi_token_id", None) or tid(BOI)
        self.eoi, self.image_token = tid(EOI), config.image_token_id
        v, q = config.vision_config, config.vq_config
        self.image_len = q.num_patches**2  # codes per generated image
        self.num_codes = q.num_embeddings
        self.und_len = (v.image_size // v.patch_size) ** 2  # placeholder tokens per understood image
        if v.num_image_tokens != self.image_len:
            raise ValueError(
                f"vision_config.num_image_tokens={v.num_image_tokens} but the VQ grid has {self.image_len} codes "
                f"(num_patches={q.num_patches}); fix config.json so HF generate and the VQ decoder agree"
            )
        self._und_head = [self.bos] + self._tok(f"{system_prompt}{self.user} ") + [self.boi]
        self._und_tail_text = f"\n{instruction}{self.assistant}"
        self._und_tail = [self.eoi] + self._tok(self._und_tail_text)
        self.rows = RowPlanner(self._shape(config), max_rows, memory_budget_gb)

    @staticmethod
    def _shape(config):
        v, q, t = config.vision_config, config.vq_config, config.text_config
        und = (v.image_size // v.patch_size) ** 2  # SigLIP's patches: the understanding turn's image tokens
        return shape_of_llama(t, codes=q.num_embeddings, head_width=q.projection_dim, image_tokens=q.num_patches**2,
                              understanding_tokens=und)  # fmt: skip

    @classmethod
    def memory_shape(cls, cfg):
        from transformers import JanusConfig

        return cls._shape(read_config(JanusConfig, local_checkpoint(cfg.path, "deepseek-community/Janus-Pro-1B")))

    max_rows = property(lambda self: self.rows.max_rows, lambda self, k: setattr(self.rows, "max_rows", k))

    # ---------------------------------------------------------------------------------------- building

    def _tok(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @classmethod
    def check_config(cls, cfg) -> list[str]:
        try:
            problem = _folder_problem(local_checkpoint(cfg.path, "deepseek-community/Janus-Pro-1B"))
        except ConfigError as e:
            return e.problems
        return [f"model.path={cfg.path!r}: {problem}"] if problem else []

    @classmethod
    def check_prompts(cls, cfg, texts: list[str]) -> list[str]:
        return [
            f"prompt {i}: empty; every prompt needs at least one token" for i, t in enumerate(texts) if not t.split()
        ]

    @classmethod
    def load(cls, cfg):
        return cls.from_pretrained(local_checkpoint(cfg.path, "deepseek-community/Janus-Pro-1B"), **load_options(cfg))

    @classmethod
    def from_pretrained(cls, path: str, *, dtype=torch.float32, attn_implementation: str = "sdpa", **kw):
        """(adapter, JanusForConditionalGeneration) from an HF-format Janus-Pro folder (config.json with
        model_type "janus", weights, tokenizer files, optional preprocessor_config.json)."""
        from transformers import AutoTokenizer, JanusForConditionalGeneration

        problem = _folder_problem(path)
        if problem:
            raise ValueError(f"{path}: {problem}")
        model = JanusForConditionalGeneration.from_pretrained(
            path, dtype=dtype, attn_implementation=attn_implementation
        )
        model.eval()
        tok = AutoTokenizer.from_pretrained(path)
        ip_path = os.path.join(path, "preprocessor_config.json")
        ip = json.loads(open(ip_path).read()) if os.path.exists(ip_path) else None
        ip = {k: ip[k] for k in IMAGE_PROCESSING if k in ip} if ip else None
        vq = copy.deepcopy(model.model.vqmodel)
        return cls(tok, model.config, vq, model.generation_config, ip, **kw), model

    def save_pretrained(self, path: str, model) -> None:
        """Model (HF format), tokenizer and preprocessor_config.json into `path`."""
        os.makedirs(path, exist_ok=True)
        unwrap(model).save_pretrained(path, safe_serialization=True)
        self.tokenizer.save_pretrained(path)
        ip = {"image_processor_type": "JanusImageProcessor", **self.image_processing}
        ip["size"] = {"height": self.image_size, "width": self.image_size}
        with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
            json.dump(ip, f, indent=1)

    def lora_targets(self, names: list[str]) -> str:
        """peft target_modules regex: `names` inside the language model only (not SigLIP's q/k/v, not the VQ)."""
        return r".*language_model\.layers\.\d+\..*\.(" + "|".join(map(str, names)) + r")"

    # -------------------------------------------------------------------------------------- text, pixels

    def tokenize_prompts(self, texts: list[str], device=None) -> PromptBatch:
        """Prompts -> PromptBatch: answer tokens (B, Lp) and generation prefixes (B, Pg), both left-padded."""
        tail = self._tok(self._und_tail_text)
        answers, prefixes = [], []
        for t in texts:
            t = " ".join(t.split())
            if not t:
                raise ValueError("empty prompt: every prompt needs at least one token")
            # the answer as tokenised after the understanding tail, so its tokens are the ones the reward scores
            full = self._tok(self._und_tail_text + " " + t)
            answers.append(full[len(tail) :] if full[: len(tail)] == tail else self._tok(" " + t))
            prefixes.append([self.bos] + self._tok(f"{self.user} {t}{self.assistant}") + [self.boi])
        ids, mask = left_pad(answers, self.pad)
        gen_ids, gen_mask = left_pad(prefixes, self.pad)
        batch = PromptBatch(ids, mask, list(texts), gen_ids, gen_mask)
        return batch.to(device) if device is not None else batch

    def decode(self, image_tokens: torch.Tensor) -> np.ndarray:
        """Codes (N, L) -> uint8 pixels (N, H, W, 3) through the VQ decoder, max_rows images at a time (0: all)."""
        return self.pixels.decode(image_tokens, self.max_rows or max(len(image_tokens), 1))

    def encode(self, pixels) -> torch.Tensor:
        """uint8 pixels (N, H, W, 3) at the VQ resolution -> codes int64 (N, L) (the VQ encoder; not exact)."""
        return self.pixels.encode(pixels)

    def pixel_values(self, images, device, dtype) -> torch.Tensor:
        """uint8 (N, H, W, 3) -> SigLIP input (N, 3, S, S), as JanusImageProcessor makes it."""
        return self.pixels.pixel_values(images, device, dtype)

    # ---------------------------------------------------------------------------------------- sequences

    def _cfg_rows(self, ids: torch.Tensor, mask: torch.Tensor, cfg: bool):
        """Generation prefixes (n, P) -> (n or 2n, P) ids and long mask; unconditional rows after conditional."""
        mask = mask.long()
        if not cfg:
            return ids, mask
        keep = (ids == self.bos) | (ids == self.boi)
        return torch.cat([ids, torch.where(keep, ids, torch.full_like(ids, self.pad))]), torch.cat([mask, mask])

    @staticmethod
    def _parts(model):
        """(JanusForConditionalGeneration, its language model body) through any wrappers."""
        lm = unwrap(model)
        return lm, lm.model.language_model

    # --------------------------------------------------------------------------------------- generation

    @torch.no_grad()
    def generate(self, model, prompts: PromptBatch, num_samples: int, sampling: SamplingConfig, generator=None):
        """Sample `num_samples` images per prompt -> codes int64 (B*G, L); row b*G+g is sample g of prompt b.

        gvu.rollout.sample_images over chunks of at most max_rows rows: each prompt prefilled once (with its
        unconditional row at cfg_scale > 1) for its samples, then one forward per code fed through the generation
        embeddings. Logits come from the generation head, CFG-combined, then temperature / top-k / top-p / min-p.
        With greedy sampling this reproduces JanusForConditionalGeneration.generate(generation_mode="image").
        """
        B, G, cfg = len(prompts), num_samples, sampling.cfg_scale > 1
        P = prompts.gen_ids.shape[1]
        step = self.rows.chunk("rollout", B * G, cfg, model, P + self.image_len, prefix_len=P)
        chunks = prompt_groups(B, G, step)
        return torch.cat([self._generate_rows(model, prompts[i.tolist()], c, sampling, generator) for i, c in chunks])

    def _generate_rows(self, model, p: PromptBatch, counts: torch.Tensor, sampling: SamplingConfig, generator):
        """counts[i] images of prompt row i -> codes (sum(counts), L): gvu.rollout.sample_images on Janus' layout
        (prefix through the text embeddings, each code fed through the generation embeddings and aligner)."""
        lm, body = self._parts(model)
        u, cfg = len(p), sampling.cfg_scale > 1
        ids, mask = self._cfg_rows(p.gen_ids, p.gen_mask, cfg)
        emb = lm.get_input_embeddings()(ids)
        head = lm.model.generation_head
        return sample_images(
            body,
            {"inputs_embeds": emb[:u]},
            mask[:u],
            counts,
            steps=self.image_len,
            fed_len=self.image_len - 1,
            feed=lambda tok, t: {"inputs_embeds": lm.prepare_embeddings_for_image_generation(tok[:, None])},
            logits=head,
            sampling=sampling,
            generator=generator,
            uncond=({"inputs_embeds": emb[u:]}, mask[u:]) if cfg else None,
            head=self._head_parts(head),
        )

    @staticmethod
    def _head_parts(head) -> HeadParts:
        """The generation head (proj_out, GELU, vision_head) split before vision_head, for sampling's CFG on its
        input (2048 wide at Janus-Pro-1B) and, on CPU, MKL's packed GEMM for its 16384 x F weight. A vision_head
        that is not a plain Linear (a LoRA on it: still affine without dropout) or is partitioned by ZeRO-3 is
        called as its module, which adds its adapter or gathers its weight."""
        features = lambda h: head.activation_fn(head.proj_out(h))  # noqa: E731
        vh = head.vision_head
        if type(vh) is not torch.nn.Linear or partitioned(vh.parameters()):
            return HeadParts(features, vh)
        return HeadParts(features, AffineProjection(vh.weight, vh.bias))

    def image_logprobs(
        self, model, prompts: PromptBatch, image_tokens: torch.Tensor, *, temperature=1.0, cfg_scale=1.0
    ):
        """log p(code_t | prompt, codes_<t) -> fp32 (B*G, L) with grad, at `temperature`; cfg_scale > 1 scores the
        CFG-combined distribution rollout sampled from, cfg_scale = 1 the conditional branch (module docstring).

        prompts: B rows; image_tokens: (B*G, L) codes, G consecutive samples per prompt. One teacher-forced pass
        per chunk of max_rows rows; the generation head's last Linear goes to kernels.linear_token_logprobs.
        """
        n = image_tokens.shape[0]
        if n % len(prompts):
            raise ValueError(f"image_tokens has {n} rows, not a multiple of the {len(prompts)} prompts")
        p = prompts.repeat_interleave(n // len(prompts))
        targets = image_tokens.long()
        step = self.rows.chunk("score", n, cfg_scale > 1, model, p.gen_ids.shape[1] + self.image_len)
        parts = [
            self._image_logprobs_rows(
                model, p.gen_ids[s : s + step], p.gen_mask[s : s + step], targets[s : s + step], temperature, cfg_scale
            )
            for s in range(0, n, step)
        ]
        return torch.cat(parts)

    def _image_logprobs_rows(self, model, gen_ids, gen_mask, targets, temperature, cfg_scale):
        lm, body = self._parts(model)
        head = lm.model.generation_head
        n, cfg = targets.shape[0], cfg_scale > 1
        ids, mask = self._cfg_rows(gen_ids, gen_mask, cfg)
        codes = torch.cat([targets, targets]) if cfg else targets
        P = ids.shape[1]
        # the last code is only predicted, never fed: L-1 code inputs give the L states that predict the codes
        emb = torch.cat([lm.get_input_embeddings()(ids), lm.prepare_embeddings_for_image_generation(codes[:, :-1])], 1)
        mask = torch.cat([mask, torch.ones_like(codes[:, :-1])], 1)
        h = body(inputs_embeds=emb, attention_mask=mask, position_ids=_positions(mask)).last_hidden_state[:, P - 1 :]
        a = head.activation_fn(head.proj_out(h))  # (m, L, F): the features the head's last Linear reads
        if cfg:  # CFG on logits == CFG on these features (the last layer is affine); fp32 against cancellation
            a = cfg_combine(a[:n].float(), a[n:].float(), cfg_scale)
        out = head.vision_head
        with gathered(out.weight, out.bias):
            w, b = saveable(out.weight), saveable(out.bias)  # kept for backward: must outlive the ZeRO-3 gather
            lp = kernels.linear_token_logprobs(
                a.to(w.dtype).reshape(-1, a.shape[-1]), w, targets.reshape(-1), bias=b, temperature=temperature
            )
        return lp.view(n, self.image_len)

    # ------------------------------------------------------------------------------------ understanding

    def prompt_logprobs(self, model, images, prompts: PromptBatch, *, with_eos: bool = False):
        """log p(prompt_j | instruction, image, prompt_<j) -> (logp fp32 (N, Lp), mask bool (N, Lp)), aligned with
        prompts.ids (left-padded); padded entries are 0.

        images: uint8 (N, H, W, 3) pixels. ONE teacher-forced pass per chunk of max_rows right-padded understanding
        sequences (a row's values do not depend on its batch); lm_head only at the states that predict prompt tokens
        (kernels.linear_token_logprobs). <eos> is not scored (the prompt's own tokens, as the official GvU reward)."""
        if with_eos:
            raise NotImplementedError("janus does not declare Ability.END_TOKEN: set grpo.reward_eos=false")
        return self._understanding(model, images, prompts, self._und_tail, prompts.mask), prompts.mask.clone()

    def answer_logprobs(self, model, images, questions: list[str], answers: list[str]):
        """log p(answer_j | image, question, answer_<j) -> (logp fp32 (N, La), mask bool (N, La)), answers left-padded:
        the understanding turn with the question as the user text and the answer as the assistant's (one pass)."""
        answers = self.tokenize_prompts(answers, next(unwrap(model).parameters()).device)
        q = question_rows([[self.eoi] + self._tok(f"\n{t}{self.assistant}") for t in questions], answers, self.pad)
        return q.answers(self._understanding(model, images, q, [], q.scored))  # each question's tail in its row

    def _understanding(self, model, images, rows, tail: list[int], scored: torch.Tensor) -> torch.Tensor:
        """fp32 (n, L) log-probs of rows' tokens (or of `scored`) after the image and `tail`, per chunk of rows."""
        n = len(rows)
        if len(images) != n:
            raise ValueError(f"{len(images)} images but {n} prompts; pass one prompt per image")
        logp = torch.zeros(rows.ids.shape, dtype=torch.float32, device=rows.ids.device)
        step = self.rows.chunk("score", n, False, model, len(self._und_head) + self.und_len + len(tail) + logp.shape[1])
        for sl in (slice(s, s + step) for s in range(0, n, step)):
            logp[sl] = self._prompt_logprobs_rows(model, images[sl], rows[sl], tail, scored[sl])
        return logp

    def understanding_inputs(self, images, prompts: PromptBatch, *, question: str | None = None) -> UnderstandingInputs:
        """[bos] "<|User|>: " [boi] [image_placeholder] x und_len [eoi] tail prompt, right-padded, with the SigLIP
        pixel_values, for `model(input_ids=..., pixel_values=...)`; with `question` its tail (answer_logprobs)."""
        tail = self._und_tail if question is None else [self.eoi] + self._tok(f"\n{question}{self.assistant}")
        prefix = torch.tensor(self._und_head + [self.image_token] * self.und_len + tail).expand(len(prompts), -1)
        pix = self.pixel_values(images, "cpu", torch.float32)
        return understanding_rows(prefix, prompts, self.pad, pixel_values=pix)

    def _prompt_logprobs_rows(self, model, images, prompts, tail: list[int], scored: torch.Tensor) -> torch.Tensor:
        """[bos] head [boi] SigLIP features, then answer_rows(tail, prompts) embedded -> fp32 (n, Lp) (AnswerRows)."""
        (lm, body), dev, n = self._parts(model), prompts.ids.device, len(prompts)
        embed = lm.get_input_embeddings()
        head = torch.tensor(self._und_head, device=dev).expand(n, -1)
        tail = torch.tensor(tail, dtype=torch.long, device=dev).expand(n, -1)
        a = answer_rows(tail, prompts, self.pad, scored=scored)
        pix = self.pixel_values(images, dev, embed.weight.dtype)
        feats = lm.model.get_image_features(pixel_values=pix).pooler_output  # (n, und_len, D)
        emb = torch.cat([embed(head), feats.to(embed.weight.dtype), embed(a.seq)], 1)
        h = body(inputs_embeds=emb).last_hidden_state  # right padding: causal attention never sees the pads
        hs = h[a.rows, head.shape[1] + self.und_len + a.pos]
        out = lm.get_output_embeddings()
        with gathered(out.weight):
            lp = kernels.linear_token_logprobs(hs, out.weight, a.targets, bias=out.bias)
        return a.scatter(lp)
