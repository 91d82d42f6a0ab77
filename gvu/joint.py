"""Joint RL (CoRL-style): the understanding task of a training step, beside generation, on the same adapter
(lora.scope: all) or on the understanding's own adapter (split: gvu.models.understanding_passes).

With `joint.enabled`, each step on each rank (Q = joint.questions_per_step / ranks questions, G = joint.group_size):
    questions   gvu/toy/questions.py: Q multiple-choice questions about images (rendered scenes of train prompts,
                this step's rollout images, or both: joint.source), every choice judged by the exact evaluator
    scores      backend.answer_logprobs, one teacher-forced pass: s[q, c] = sum_j log p(choice_j | image, question)
    policy      pi(c | q, image) = softmax_c(s[q, c] / joint.temperature) over the question's choices
    rollout     G answers per question drawn from pi, no grad, at this step's weights (the images' too)
    rewards     1.0 when the drawn choice holds for the image (exact), else 0.0
    advantages  kernels.group_advantages over each question's G answers (grpo.scale_rewards, grpo.adv_eps)
    reference   log pi_ref(chosen) with the adapter disabled (joint.beta > 0)
    loss        gvu.grpo.grpo_loss on log pi(chosen), each answer a one-token sequence (clipped surrogate with
                grpo.eps_low/high, k3 KL), recomputed with grad in train.update_policy: the questions are split over
                the generation's micro-batches and micro-batch i backpropagates
                gen_weight * L_gen_i + weight * L_und_i * (Q_i * n_micro / Q), so DeepSpeed's mean over the
                micro-batches of one optimizer step is gen_weight * L_gen + weight * L_und (one backward per
                micro-batch, one engine.step at the boundary, as without joint RL)
With joint.captions_per_step = N > 0, the same step also has a free-text task (N / ranks scenes, G captions each):
    captions    backend.caption(greedy=False): G captions per fresh scene of a train prompt, sampled at temperature 1
                over the words and <eos> (the understanding's own decoding), no grad
    rewards     0 unless the caption, parsed, holds for its scene (questions.caption_holds: what caption accuracy
                reads), then (1 + stated) / (1 + facts) of the scene's colours and relation (questions.caption_reward)
    loss        gvu.grpo.grpo_loss on the caption's tokens and its <eos> (backend.prompt_logprobs, with_eos), the
                understanding's log-probs over the whole vocabulary (the sampler saw the words only: the mass off
                them is the old and new policy's alike), k3 KL with joint.beta; added to the questions' loss
    An empty caption (<eos> first) has no token to score: it counts 0 in its group and adds no loss term.
Exact answers exist only in the toy world: the configuration check refuses joint RL on other backends.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import torch

import kernels
from gvu.grpo import grpo_loss
from gvu.models import adapter_disabled, understanding_passes, unwrap


def choice_scores(backend, model, images, questions) -> torch.Tensor:
    """s[q, c] = sum of the log-probs of choice c's tokens after question q about images[q] -> fp32 (Q, C_max),
    -inf where question q has fewer choices. images uint8 (Q, H, W, 3); one answer_logprobs pass over every choice."""
    n = [len(q.choices) for q in questions]
    rows = np.repeat(np.arange(len(questions)), n)
    asked = [q.question for q in questions for _ in q.choices]
    logp, mask = backend.answer_logprobs(model, images[rows], asked, [c for q in questions for c in q.choices])
    s = (logp * mask).sum(1)
    out = torch.full((len(questions), max(n)), float("-inf"), dtype=torch.float32, device=s.device)
    cols = torch.as_tensor(np.concatenate([np.arange(k) for k in n]), device=s.device)
    return out.index_put((torch.as_tensor(rows, device=s.device), cols), s.float())


def policy_logprobs(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """log pi(c | q) = log_softmax(s / T) over each row's choices: fp32 (Q, C) -> (Q, C), -inf stays -inf."""
    return torch.log_softmax(scores / temperature, dim=1)


def draw_answers(logp: torch.Tensor, G: int, generator: torch.Generator) -> torch.Tensor:
    """G answers per question from pi = exp(logp) (Q, C), with replacement -> int64 (Q, G)."""
    return torch.multinomial(logp.exp().cpu(), G, replacement=True, generator=generator)


def truth_table(questions, C: int) -> torch.Tensor:
    """bool (Q, C): choice c of question q holds for its image (False at padding)."""
    t = torch.zeros((len(questions), C), dtype=torch.bool)
    for i, q in enumerate(questions):
        t[i, : len(q.truth)] = torch.tensor(q.truth)
    return t


@dataclass
class CaptionRollout:
    """This rank's captioning rollout of one step (S scenes, G captions each, row s*G + g; K rows kept: non-empty)."""

    images: np.ndarray  # uint8 (K, H, W, 3): kept row k's scene
    prompts: object  # PromptBatch of the K kept captions
    advantages: torch.Tensor  # fp32 (K,)
    ref_logp: torch.Tensor | None  # fp32 (K, Lp + 1), joint.beta > 0
    old_logp: torch.Tensor  # fp32 (K, Lp + 1): update 0's log-probs

    def loss(self, backend, model, part: int, parts: int, update: int, cfg) -> tuple[torch.Tensor, dict] | None:
        """Micro-batch `part` of `parts`: its captions' GRPO loss with grad, scaled so that the mean over the parts
        is the loss of all K captions -> (loss, {und/caption/kl}); None without captions in that part."""
        K = len(self.advantages)
        ks = np.array_split(np.arange(K), parts)[part]
        if not len(ks):
            return None
        with understanding_passes(model, cfg.lora.scope):
            logp, mask = backend.prompt_logprobs(model, self.images[ks], self.prompts[ks.tolist()], with_eos=True)
        rows = torch.as_tensor(ks)
        if update == 0:
            self.old_logp[rows] = logp.detach().cpu()
        dev = logp.device
        ref = None if self.ref_logp is None else self.ref_logp[rows].to(dev)
        loss, m = grpo_loss(
            logp, self.old_logp[rows].to(dev), self.advantages[rows].to(dev), mask, ref_logp=ref,
            beta=cfg.joint.beta, eps_low=cfg.grpo.eps_low, eps_high=cfg.grpo.eps_high,
        )  # fmt: skip
        return loss * (len(ks) * parts / K), {"und/caption/kl": m["kl"].item()}


@dataclass
class Rollout:
    """This rank's understanding rollout of one step (Q questions, G answers each, row q*G + g)."""

    images: np.ndarray  # uint8 (Q, H, W, 3): question q's image
    questions: list
    chosen: torch.Tensor  # int64 (Q, G)
    advantages: torch.Tensor  # fp32 (Q*G,)
    ref_logp: torch.Tensor | None  # fp32 (Q*G,), joint.beta > 0
    old_logp: torch.Tensor  # fp32 (Q*G,): update 0's log pi(chosen), the old policy of later updates
    metrics: dict = field(default_factory=dict)
    captions: CaptionRollout | None = None  # joint.captions_per_step > 0

    def loss(self, backend, model, part: int, parts: int, update: int, cfg) -> tuple[torch.Tensor, dict] | None:
        """Micro-batch `part` of `parts`: the questions' loss (+ the captions' loss) of that part -> (loss, metrics);
        None when the part has neither."""
        terms = [self.question_loss(backend, model, part, parts, update, cfg)]
        if self.captions is not None:
            terms.append(self.captions.loss(backend, model, part, parts, update, cfg))
        terms = [t for t in terms if t is not None]
        if not terms:
            return None
        return sum(t[0] for t in terms), {k: v for t in terms for k, v in t[1].items()}

    def question_loss(self, backend, model, part: int, parts: int, update: int, cfg):
        """Micro-batch `part` of `parts`: its questions' GRPO loss with grad, scaled so that the mean over the parts
        is the loss of all Q questions (module docstring) -> (loss, {und/kl, und/clip_frac}); None without questions
        in that part."""
        Q, G = len(self.questions), self.chosen.shape[1]
        qs = np.array_split(np.arange(Q), parts)[part]
        if not len(qs):
            return None
        with understanding_passes(model, cfg.lora.scope):
            scores = choice_scores(backend, model, self.images[qs], [self.questions[i] for i in qs])
        logp = policy_logprobs(scores, cfg.joint.temperature).gather(1, self.chosen[qs].to(scores.device))
        logp = logp.reshape(-1, 1)  # (len(qs) * G, 1): an answer is a one-token sequence
        rows = torch.as_tensor((qs[:, None] * G + np.arange(G)).reshape(-1))
        if update == 0:
            self.old_logp[rows] = logp.detach().squeeze(1).cpu()
        dev, ones = logp.device, torch.ones_like(logp, dtype=torch.bool)
        ref = None if self.ref_logp is None else self.ref_logp[rows].to(dev).unsqueeze(1)
        loss, m = grpo_loss(
            logp, self.old_logp[rows].to(dev).unsqueeze(1), self.advantages[rows].to(dev), ones, ref_logp=ref,
            beta=cfg.joint.beta, eps_low=cfg.grpo.eps_low, eps_high=cfg.grpo.eps_high,
        )  # fmt: skip
        return loss * (len(qs) * parts / Q), {"und/kl": m["kl"].item(), "und/clip_frac": m["clip_frac"].item()}


class UnderstandingTask:
    """The questions' source for a run (toy only) and the understanding rollout of each step."""

    def __init__(self, cfg, train_metas: list[dict], world: int):
        from gvu.toy.questions import ToyQuestions  # exact answers come from the shapes world (validate: toy only)

        self.source = ToyQuestions(train_metas, cfg.joint.kinds)
        self.kinds = list(cfg.joint.kinds)
        self.n = cfg.joint.questions_per_step // world
        self.n_captions = cfg.joint.captions_per_step // world

    def questions(self, metas, images, cfg, rng: random.Random):
        """This step's questions and their images (uint8 (Q, H, W, 3)) under joint.source."""
        G, src = cfg.grpo.group_size, cfg.joint.source
        n_gen = 0 if src == "rendered" else self.n if src == "generated" else self.n - self.n // 2
        rendered, pixels = self.source.rendered(self.n - n_gen, rng)
        gen = self.source.generated([m for m in metas for _ in range(G)], images, n_gen, rng) if n_gen else []
        if not gen:
            return rendered, pixels
        return rendered + gen, np.concatenate([pixels, np.asarray(images)[[q.image for q in gen]]]).astype(np.uint8)

    @torch.no_grad()
    def rollout(self, backend, model, metas, images, cfg, step: int, rank: int) -> Rollout:
        """Questions, scores, G answers each, rewards, advantages, reference -> Rollout; model in eval mode."""
        j, g = cfg.joint, cfg.grpo
        rng = random.Random(f"joint/{cfg.train.seed}/{step}/{rank}")  # str seeds are hashed stably (sha512)
        questions, qimages = self.questions(metas, images, cfg, rng)
        gen = torch.Generator().manual_seed(rng.getrandbits(63))
        Q, G = len(questions), j.group_size
        captions, cap_metrics = self.caption_rollout(backend, model, cfg, rng, gen) if self.n_captions else (None, {})
        if not Q:
            return Rollout(qimages, [], torch.zeros((0, G), dtype=torch.long), torch.zeros(0), None, torch.zeros(0),
                           self.metrics(questions, torch.zeros(0, 1), torch.zeros((0, 1), dtype=torch.bool),
                                        torch.zeros(0), G) | cap_metrics, captions)  # fmt: skip
        with understanding_passes(model, cfg.lora.scope):
            logp = policy_logprobs(choice_scores(backend, model, qimages, questions), j.temperature).cpu()
        chosen = draw_answers(logp, G, gen)
        truth = truth_table(questions, logp.shape[1])
        rewards = truth.gather(1, chosen).float().reshape(-1)
        adv = kernels.group_advantages(rewards, G, eps=g.adv_eps, scale=g.scale_rewards)
        ref = None
        if j.beta > 0:
            with adapter_disabled(model):
                ref_all = policy_logprobs(choice_scores(backend, model, qimages, questions), j.temperature).cpu()
            ref = ref_all.gather(1, chosen).reshape(-1)
        return Rollout(qimages, questions, chosen, adv, ref, torch.zeros(Q * G), self.metrics(questions, logp, truth,
                       rewards, G) | cap_metrics, captions)  # fmt: skip

    def caption_rollout(self, backend, model, cfg, rng: random.Random, gen: torch.Generator):
        """G sampled captions of each of this rank's fresh scenes, judged exactly -> (CaptionRollout, metrics
        und/caption/{reward, empty})."""
        from gvu.toy.questions import caption_reward
        from gvu.toy.world import render

        j, g, G = cfg.joint, cfg.grpo, cfg.joint.group_size
        metas, scenes = self.source.caption_scenes(self.n_captions, rng)
        metas, scenes = [m for m in metas for _ in range(G)], np.repeat(scenes, G, axis=0)  # row s*G + g
        pixels = render(scenes)
        with understanding_passes(model, cfg.lora.scope):
            texts = backend.caption(model, pixels, greedy=False, generator=gen)
        rewards = torch.tensor([caption_reward(t, c, m) for t, c, m in zip(texts, scenes, metas, strict=True)])
        adv = kernels.group_advantages(rewards, G, eps=g.adv_eps, scale=g.scale_rewards)
        kept = np.array([i for i, t in enumerate(texts) if t.split()], dtype=np.int64)
        metrics = {"und/caption/reward": rewards.mean().item(), "und/caption/empty": 1 - len(kept) / len(texts)}
        if not len(kept):
            return None, metrics
        images = pixels[kept]
        prompts = backend.tokenize_prompts([texts[i] for i in kept], device=next(unwrap(model).parameters()).device)
        ref = None
        if j.beta > 0:
            with adapter_disabled(model):
                ref = backend.prompt_logprobs(model, images, prompts, with_eos=True)[0].cpu()
        width = prompts.ids.shape[1] + 1  # the caption's words and its <eos>
        return CaptionRollout(images, prompts, adv[torch.as_tensor(kept)], ref, torch.zeros(len(kept), width)), metrics

    def metrics(self, questions, logp, truth, rewards, G) -> dict[str, float]:
        """und/{reward/mean, reward/group_std, accuracy (the most likely choice holds), p_true (pi's mass on true
        choices), questions} and und/<kind>/{asked, correct} for every configured kind; also the sums behind the
        means (und/sum/*), so that `summarise` re-forms each mean over all ranks' questions after the rank average
        (a rank may have no questions: joint.source generated)."""
        Q = len(questions)
        greedy = truth.gather(1, logp.argmax(1, keepdim=True)).squeeze(1) if Q else torch.zeros(0, dtype=torch.bool)
        sums = {
            "und/sum/reward": rewards.sum().item() if Q else 0.0,
            "und/sum/group_std": rewards.view(-1, G).std(1).sum().item() if Q else 0.0,
            "und/sum/correct": greedy.float().sum().item() if Q else 0.0,
            "und/sum/p_true": (logp.exp() * truth).sum().item() if Q else 0.0,
        }
        out = {**sums, "und/questions": float(Q)}
        for k in self.kinds:
            sel = [i for i, q in enumerate(questions) if q.kind == k]
            out[f"und/{k}/asked"] = float(len(sel))
            out[f"und/{k}/correct"] = float(greedy[sel].sum()) if sel else 0.0
        return summarise(out, (), G)  # per-kind accuracy only after the rank average (NaN for a kind not asked)


def summarise(metrics: dict, kinds, G: int) -> dict[str, float]:
    """The means from the (rank-averaged) sums and counts: und/{reward/mean, reward/group_std, accuracy, p_true}
    over every question of the step, and und/<kind>/accuracy = correct / asked (per_kind_accuracy); NaN where no
    question was asked. The rank average scales sums and counts alike, so the ratios are the all-rank ones."""
    q = metrics["und/questions"]
    per_q = {"und/reward/mean": metrics["und/sum/reward"] / G, "und/reward/group_std": metrics["und/sum/group_std"],
             "und/accuracy": metrics["und/sum/correct"], "und/p_true": metrics["und/sum/p_true"]}  # fmt: skip
    out = {**metrics, **{k: v / q if q else float("nan") for k, v in per_q.items()}}
    if not q:
        out["und/reward/group_std"] = 0.0
    return out | per_kind_accuracy(metrics, kinds)


def per_kind_accuracy(metrics: dict, kinds) -> dict[str, float]:
    """und/<kind>/accuracy = correct / asked of the (rank-averaged) counts; NaN for a kind not asked this step."""
    out = {}
    for k in kinds:
        n = metrics.get(f"und/{k}/asked", 0.0)
        out[f"und/{k}/accuracy"] = metrics.get(f"und/{k}/correct", 0.0) / n if n else float("nan")
    return out
