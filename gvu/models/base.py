"""The backend contract: what the trainer needs from a unified multimodal model (docs/DESIGN.md, "Backends").

A backend holds a model's *layout* (tokenizer, sequence formats, image codec) and no trained weights. Every
method that runs the network takes the module to run first: the policy is the peft model inside the DeepSpeed
engine, the reference is the same module inside `gvu.models.adapter_disabled`. Backends are registered by name
in `gvu.models` (`model.backend`), and what a backend can do beyond the required methods is declared in its
`abilities`; the configuration check (gvu.config.check) refuses options that need an undeclared ability, so the
trainer, reward and evaluation code never probe a backend.
"""

from __future__ import annotations

import enum
import inspect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Protocol

import numpy as np
import torch

if TYPE_CHECKING:
    from torch import nn

    from gvu.config import ModelConfig
    from gvu.models.rows import MemoryShape
    from gvu.rollout import SamplingConfig


class Ability(str, enum.Enum):
    """Optional abilities of a backend; each names the method (or keyword) it adds to the contract."""

    CAPTION = "caption"  # caption(model, images, greedy=True, max_words=16, generator=None) -> list[str]
    END_TOKEN = "end_token"  # prompt_logprobs(..., with_eos=True) also scores the caption's end token
    IMAGE_HEAD_UPDATE = "image_head_update"  # add_image_head_update(model): a trained update of the image head
    LORA_NARROWING = "lora_narrowing"  # lora_targets(names): peft target_modules limited to the language model
    QUESTIONS = "questions"  # answer_logprobs reads free-text questions (else only caption-language prefixes)


# the option that needs each ability, for the configuration check's message
ABILITY_OPTIONS = {
    Ability.CAPTION: "the shapes world's understanding evaluation (data.prompts=shapes)",
    Ability.END_TOKEN: "grpo.reward_eos=true",
    Ability.IMAGE_HEAD_UPDATE: "lora.image_head=factorised",
    Ability.QUESTIONS: "grpo.rewards: yes_prob (a free-text question to the model's own understanding)",
}
ABILITY_METHODS = {
    Ability.CAPTION: "caption",
    Ability.IMAGE_HEAD_UPDATE: "add_image_head_update",
    Ability.LORA_NARROWING: "lora_targets",
}


@dataclass
class PromptBatch:
    """Tokenised prompts, the one batch type every backend returns from `tokenize_prompts`.

    ids / mask: the prompt's own tokens as the understanding turn scores them (the reward's targets),
        left-padded, int64 (B, Lp) / bool (B, Lp) True at real tokens.
    gen_ids / gen_mask: the whole generation prefix up to the begin-of-image token, int64 (B, Pg) / bool (B, Pg),
        padded before the prompt's tokens (the toy keeps its bos in column 0) and ending with a real token in every
        row: what a plain `model.generate` would be given (benchmarks, parity tests).
    """

    ids: torch.Tensor
    mask: torch.Tensor
    texts: list[str]
    gen_ids: torch.Tensor
    gen_mask: torch.Tensor

    def __len__(self) -> int:
        return self.ids.shape[0]

    def _map(self, fn, texts: list[str]) -> PromptBatch:
        return PromptBatch(fn(self.ids), fn(self.mask), texts, fn(self.gen_ids), fn(self.gen_mask))

    def repeat_interleave(self, g: int) -> PromptBatch:
        """Each prompt g times in a row: (B, .) -> (B*g, .); row b*g+i is prompt b."""
        return self._map(lambda t: t.repeat_interleave(g, 0), [t for t in self.texts for _ in range(g)])

    def to(self, device) -> PromptBatch:
        return self._map(lambda t: t.to(device), self.texts)

    def __getitem__(self, idx) -> PromptBatch:
        """Rows `idx` (an index, a slice or an index list) as a batch, keeping the batch's left padding."""
        rows = [idx] if isinstance(idx, int) else list(range(len(self)))[idx] if isinstance(idx, slice) else list(idx)
        return self._map(lambda t: t[rows], [self.texts[i] for i in rows])


def load_options(cfg) -> dict:
    """The model section's options an HF-backed backend's from_pretrained takes (cfg: gvu.config.ModelConfig)."""
    from gvu.models.wrapping import attn_implementation

    return dict(
        dtype=getattr(torch, cfg.dtype),
        attn_implementation=attn_implementation(cfg.attn_implementation),
        max_rows=cfg.max_rows,
        memory_budget_gb=cfg.memory_budget_gb,
        instruction=cfg.instruction,
    )


def left_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> left-padded ids int64 (B, L) and mask bool (B, L)."""
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), L), dtype=torch.bool)
    for i, r in enumerate(rows):
        if r:
            ids[i, L - len(r) :] = torch.tensor(r)
            mask[i, L - len(r) :] = True
    return ids, mask


@dataclass
class UnderstandingInputs:
    """The reward's teacher-forced understanding rows as a plain forward of the model takes them.

    input_ids int64 (N, P + L) right-padded: the understanding prefix (image placeholders included) then the prompt;
    forward_kwargs: what else the forward needs (e.g. pixel_values (N, 3, S, S)); targets int64 (N, L) / mask bool
    (N, L): the prompt tokens scored, left-aligned, so position P - 1 + j predicts targets[:, j]. Baselines (the
    official per-token loop, an eager full-logits pass) and tests read this; the trainer does not.
    """

    input_ids: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor
    forward_kwargs: dict = field(default_factory=dict)


def understanding_rows(prefix: torch.Tensor, prompts: PromptBatch, pad: int, **forward_kwargs) -> UnderstandingInputs:
    """Each row's understanding prefix (N, P) then its prompt tokens, right-padded -> UnderstandingInputs."""
    words = [row[m].tolist() for row, m in zip(prompts.ids.cpu(), prompts.mask.cpu(), strict=True)]
    (n, P), L = prefix.shape, max(len(w) for w in words)
    ids = torch.full((n, P + L), pad, dtype=torch.long)
    ids[:, :P] = prefix.cpu()
    targets = torch.full((n, L), pad, dtype=torch.long)
    mask = torch.zeros((n, L), dtype=torch.bool)
    for i, w in enumerate(words):
        ids[i, P : P + len(w)] = targets[i, : len(w)] = torch.tensor(w, dtype=torch.long)
        mask[i, : len(w)] = True
    return UnderstandingInputs(ids, targets, mask, forward_kwargs)


@dataclass
class AnswerRows:
    """Right-padded understanding rows `seq` (N, P + Lp [+ 1]) = a prefix, then each prompt (then an end token), and
    where their scored tokens sit: the state at (rows, pos) predicts `targets`, which is prompts.ids[rows, cols]
    (cols == Lp: the end token). Right padding keeps a row's values independent of its batch (causal attention
    never sees the pads)."""

    seq: torch.Tensor
    rows: torch.Tensor
    pos: torch.Tensor
    cols: torch.Tensor
    targets: torch.Tensor
    width: int

    def scatter(self, lp: torch.Tensor) -> torch.Tensor:
        """Log-probs of the scored tokens (rows/cols order) -> fp32 (N, width) aligned with prompts.ids, 0 at pads."""
        out = torch.zeros((self.seq.shape[0], self.width), dtype=torch.float32, device=lp.device)
        out[self.rows, self.cols] = lp.float()
        return out


def answer_rows(
    prefix: torch.Tensor, prompts: PromptBatch, pad: int, end: int | None = None, scored: torch.Tensor | None = None
) -> AnswerRows:
    """prefix int64 (N, P) + the left-padded prompts (+ `end` after each) -> AnswerRows. `scored` bool (N, Lp), a
    subset of prompts.mask: score only those tokens (QuestionRows: the answer after its question); all by default."""
    dev = prompts.ids.device
    (n, Lp), P = prompts.ids.shape, prefix.shape[1]
    lens = prompts.mask.sum(1)
    col = torch.arange(Lp, device=dev).unsqueeze(0) - (Lp - lens).unsqueeze(1)  # column j sits at P + j - pads
    seq = torch.full((n, P + Lp + int(end is not None)), pad, dtype=torch.long, device=dev)
    seq[:, :P] = prefix
    rows, cols = prompts.mask.nonzero(as_tuple=True)
    seq[rows, P + col[rows, cols]] = prompts.ids[rows, cols]
    if scored is not None:
        rows, cols = scored.nonzero(as_tuple=True)
    pos, targets = P - 1 + col[rows, cols], prompts.ids[rows, cols]
    if end is not None:
        ar = torch.arange(n, device=dev)
        seq[ar, P + lens] = end
        rows, pos, cols = (
            torch.cat([rows, ar]),
            torch.cat([pos, P - 1 + lens]),
            torch.cat([cols, torch.full_like(ar, Lp)]),
        )
        targets = torch.cat([targets, torch.full_like(ar, end)])
    return AnswerRows(seq, rows, pos, cols, targets, Lp + int(end is not None))


@dataclass
class QuestionRows:
    """Each row's question tokens then its answer's, left-padded: ids int64 (N, L), mask bool (N, L) at real tokens,
    scored bool (N, L) at the answer's tokens (each row's last ones). answer_rows places them like prompts, and
    scores only `scored`; `answers(logp)` takes the answer's columns back out."""

    ids: torch.Tensor
    mask: torch.Tensor
    scored: torch.Tensor
    answer_mask: torch.Tensor  # bool (N, La): the answers as tokenize_prompts left-pads them

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, idx: slice) -> QuestionRows:
        return QuestionRows(self.ids[idx], self.mask[idx], self.scored[idx], self.answer_mask[idx])

    def answers(self, logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 (N, L) aligned with ids -> (logp fp32 (N, La), mask bool (N, La)) aligned with the answers."""
        La = self.answer_mask.shape[1]
        return logp[:, logp.shape[1] - La :] * self.answer_mask, self.answer_mask.clone()


def question_rows(questions: list[list[int]], answers: PromptBatch, pad: int) -> QuestionRows:
    """Question token lists (N rows, may be empty) + the answers' PromptBatch (N rows) -> QuestionRows."""
    words = [row[m].tolist() for row, m in zip(answers.ids.cpu(), answers.mask.cpu(), strict=True)]
    if len(questions) != len(words):
        raise ValueError(f"{len(questions)} questions but {len(words)} answers; pass one answer per question")
    ids, mask = left_pad([q + a for q, a in zip(questions, words, strict=True)], pad)
    scored = torch.zeros_like(mask)
    for i, a in enumerate(words):
        scored[i, mask.shape[1] - len(a) :] = True
    dev = answers.ids.device
    return QuestionRows(ids.to(dev), mask.to(dev), scored.to(dev), answers.mask.clone())


def scored_mask(prompts: PromptBatch, with_eos: bool) -> torch.Tensor:
    """bool (N, Lp [+ 1]): the prompt's tokens (and the end token's column) that prompt_logprobs scores."""
    if not with_eos:
        return prompts.mask.clone()
    return torch.cat([prompts.mask, torch.ones((len(prompts), 1), dtype=torch.bool, device=prompts.mask.device)], 1)


class UMMBackend(Protocol):
    """A unified multimodal model as the trainer sees it. Image tokens are codebook ids int64 (N, image_len) in
    raster order; row b*G + g of a rollout is sample g of prompt b. Every log-prob is fp32."""

    name: ClassVar[str]
    abilities: ClassVar[frozenset[Ability]]
    image_len: int  # image tokens per image
    num_codes: int  # codebook size K: image tokens are in [0, K)

    @classmethod
    def check_config(cls, cfg: ModelConfig) -> list[str]:
        """Problems with the model section (the checkpoint folder and its files), found without loading weights."""

    @classmethod
    def check_prompts(cls, cfg: ModelConfig, texts: list[str]) -> list[str]:
        """Problems with prompt texts (empty, words outside a closed vocabulary), found without loading weights."""

    @classmethod
    def memory_shape(cls, cfg: ModelConfig) -> MemoryShape:
        """The sizes rows per forward are planned from (layers, KV heads, head dim, hidden, codes, image tokens;
        gvu/models/rows.py), read from the checkpoint's config.json without loading weights."""

    @classmethod
    def load(cls, cfg: ModelConfig) -> tuple[UMMBackend, nn.Module]:
        """(backend, transformers model in eval mode, dtype cfg.dtype) from cfg.path; no download."""

    def tokenize_prompts(self, texts: list[str], device=None) -> PromptBatch:
        """B prompt texts -> PromptBatch (B rows)."""

    def generate(
        self, model, prompts: PromptBatch, num_samples: int, sampling: SamplingConfig, generator=None
    ) -> torch.Tensor:
        """Sample `num_samples` images per prompt -> int64 (B*G, image_len), with sampling's CFG / temperature /
        top-k / top-p / min-p; greedy sampling must equal the model's own `generate` (tested)."""

    def decode(self, image_tokens: torch.Tensor) -> np.ndarray:
        """int64 (N, image_len) -> uint8 pixels (N, H, W, 3)."""

    def image_logprobs(
        self, model, prompts: PromptBatch, image_tokens: torch.Tensor, *, temperature: float = 1.0, cfg_scale=1.0
    ) -> torch.Tensor:
        """log p(code_t | prompt, codes_<t) -> fp32 (B*G, image_len), differentiable; prompts has B rows, tokens
        G consecutive rows per prompt. cfg_scale > 1 scores the CFG-combined distribution rollout sampled from."""

    def prompt_logprobs(
        self, model, images, prompts: PromptBatch, *, with_eos: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """log p(prompt_j | instruction, image, prompt_<j) for uint8 images (N, H, W, 3) and N prompt rows ->
        (logp fp32 (N, Lp), mask bool (N, Lp)) aligned with prompts.ids; one batched teacher-forced pass, a row's
        values independent of its batch. `with_eos` (Ability.END_TOKEN) appends the end token's column (N, Lp+1)."""

    def answer_logprobs(
        self, model, images, questions: list[str], answers: list[str]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """log p(answer_j | image, question, answer_<j) for uint8 images (N, H, W, 3) -> (logp fp32 (N, La), mask
        bool (N, La)), the answers left-padded as tokenize_prompts(answers) pads them (0 at pads): each answer
        teacher-forced after the understanding turn whose user text is its question (in place of the instruction;
        without Ability.QUESTIONS a question is a caption prefix, "" none). One batched pass through the rows
        prompt_logprobs uses (QuestionRows), a row's values independent of its batch."""

    def understanding_inputs(self, images, prompts: PromptBatch, *, question: str | None = None) -> UnderstandingInputs:
        """The rows `prompt_logprobs` scores, for a plain forward (baselines and tests); with `question`, the rows
        answer_logprobs builds for that question, the prompts holding the answers."""

    def save_pretrained(self, path: str, model) -> None:
        """`model`'s weights and everything `load` reads (tokenizer, layout / processor files) into folder `path`: a
        checkpoint `model.path` can name (gvu.merge writes a run's merged model with it)."""


REQUIRED = (
    "tokenize_prompts", "generate", "decode", "image_logprobs", "prompt_logprobs", "answer_logprobs",
    "understanding_inputs", "save_pretrained",
)  # fmt: skip
REQUIRED_CLASSMETHODS = ("check_config", "check_prompts", "memory_shape", "load")


def contract_problems(cls: type) -> list[str]:
    """What a backend class lacks of the contract: required methods, declared abilities' methods, attributes."""
    who = getattr(cls, "__name__", str(cls))
    out = []
    if not isinstance(getattr(cls, "name", None), str):
        out.append(f"{who}.name must be the backend's registered name (a str)")
    abilities = getattr(cls, "abilities", None)
    if not isinstance(abilities, frozenset) or not all(isinstance(a, Ability) for a in abilities):
        out.append(f"{who}.abilities must be a frozenset of gvu.models.base.Ability")
        abilities = frozenset()
    for m in REQUIRED + REQUIRED_CLASSMETHODS:
        if not callable(getattr(cls, m, None)):
            out.append(f"{who}.{m} is missing (required by the backend contract)")
    for a in abilities:
        m = ABILITY_METHODS.get(a)
        if m and not callable(getattr(cls, m, None)):
            out.append(f"{who} declares {a.value} but has no {m}()")
    pl = getattr(cls, "prompt_logprobs", None)
    if callable(pl) and "with_eos" not in inspect.signature(pl).parameters:
        out.append(f"{who}.prompt_logprobs must take the keyword with_eos (False unless it declares end_token)")
    return out


def require(backend: type | UMMBackend, ability: Ability) -> str | None:
    """None if the backend declares `ability`, else the configuration check's message naming backend and option."""
    if ability in backend.abilities:
        return None
    return (
        f"{ABILITY_OPTIONS.get(ability, ability.value)} needs the backend ability {ability.value!r}, which "
        f"model.backend={backend.name!r} does not have (its abilities: {sorted(a.value for a in backend.abilities)})"
    )
