"""Rewards from the model's own understanding answering questions about its image (no external judge).

qa (UniRL-style): questions derived from the prompt's GenEval metadata, one per fact the prompt states: each
    object (its class), each exact count (>= 2; "a X" is the object's question), colour, size and position relation.
    Score = the understanding's probability of the correct answer (the product of its token probabilities),
    averaged over the item's questions; NaN for an item with none (a prompt outside GenEval's wording).
    A backend with Ability.QUESTIONS is asked free-text questions ("How many dogs are in the image?" -> "two");
    one without (the toy: pretrained on captions only) gets each question as a cloze on its caption language:
    the prompt up to the fact's words is the question, those words the answer ("a photo of" -> "two").
yes_prob (Janus-Pro-R1 / VQAScore-style): p(Yes) / (p(Yes) + p(No)) for "does the image show <prompt>?"; needs
    Ability.QUESTIONS.
"""

from __future__ import annotations

import numpy as np
import torch

from gvu.models.base import Ability
from gvu.rewards.registry import register_reward

NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine"}
YES_PROB_QUESTION = "Does the image show {prompt}? Answer Yes or No."
YES, NO = "Yes", "No"
# every word of the free-text templates (tiny test tokenizers need them: gvu.testing)
TEMPLATE_WORDS = "Is there How many are What color is size Does show ? Answer Yes or No".split()


def slots(meta: dict) -> tuple[list[str], list[tuple[str, int, int, int]]] | None:
    """The prompt's words and, per fact, (kind, first word, end word, include index); kinds: object, count, size,
    color, position. Read in GenEval's wording ('a photo of' NP (and NP)* | 'a photo of' NP REL NP, NP = det|number
    [size] [color] noun); None when the prompt is not in it."""
    words, inc = meta.get("prompt", "").split(), meta.get("include") or []
    if not inc or words[:3] != ["a", "photo", "of"]:
        return None
    rel = [i for i, e in enumerate(inc) if "position" in e]
    order = [rel[0], inc[rel[0]]["position"][1]] if rel else list(range(len(inc)))
    i, out = 3, []
    for k, j in enumerate(order):
        if k:
            joint = inc[rel[0]]["position"][0].split() if rel else ["and"]
            if words[i : i + len(joint)] != joint:
                return None
            if rel:
                out.append(("position", i, i + len(joint), rel[0]))
            i += len(joint)
        e, noun = inc[j], inc[j]["class"].split()
        det = words[i] if i < len(words) else ""
        if (e["count"] == 1 and det not in ("a", "an")) or (e["count"] > 1 and det != NUMBER_WORDS.get(e["count"])):
            return None
        if e["count"] > 1:
            out.append(("count", i, i + 1, j))
        i += 1
        for attr in ("size", "color"):
            if attr in e:
                if i >= len(words) or words[i] != e[attr]:
                    return None
                out.append((attr, i, i + 1, j))
                i += 1
        said, keep = words[i : i + len(noun)], len(noun) - (e["count"] > 1)  # a plural's last word is free ("knives")
        if len(said) != len(noun) or said[:keep] != noun[:keep]:
            return None
        out.append(("object", i, i + len(noun), j))
        i += len(noun)
    return (words, out) if i == len(words) else None


def questions(meta: dict, free_text: bool) -> list[tuple[str, str]]:
    """(question, correct answer) per fact of the prompt (module docstring); [] outside GenEval's wording."""
    found = slots(meta)
    if found is None:
        return []
    words, facts = found
    if not free_text:
        return [(" ".join(words[:a]), " ".join(words[a:b])) for _, a, b, _ in facts]
    inc = meta["include"]
    noun = {j: " ".join(words[a:b]) for kind, a, b, j in facts if kind == "object"}

    def the(j):  # ("is", "the dog") or ("are", "the dogs")
        return ("is" if inc[j]["count"] == 1 else "are"), f"the {noun[j]}"

    out = []
    for kind, a, b, j in facts:
        e = inc[j]
        if kind == "object":
            art = "an" if e["class"][0] in "aeiou" else "a"
            out.append((f"Is there {art} {e['class']} in the image?", YES))
        elif kind == "count":
            out.append((f"How many {noun[j]} are in the image?", words[a]))
        elif kind in ("color", "size"):
            verb, np_ = the(j)
            out.append((f"What {kind} {verb} {np_}?", e[kind]))
        else:
            verb, np_ = the(j)
            out.append((f"{verb.capitalize()} {np_} {' '.join(words[a:b])} {the(e['position'][1])[1]}?", YES))
    return out


def _rows(images, idx: list[int]):
    """images (N, H, W, 3) numpy or torch -> the rows idx, same type."""
    return images[np.asarray(idx)] if isinstance(images, np.ndarray) else images[torch.as_tensor(idx)]


def answer_probs(backend, model, images, asked: list[tuple[str, str]]) -> torch.Tensor:
    """p(answer | image, question) -> fp32 (N,) for one (question, answer) per image row."""
    logp, mask = backend.answer_logprobs(model, images, [q for q, _ in asked], [a for _, a in asked])
    return (logp * mask).sum(1).exp()


@register_reward("qa", metadata=True)
def qa_reward(backend, model, images, codes, prompts, metas, cfg) -> torch.Tensor:
    """Mean over each item's questions of p(correct answer) -> fp32 (N,); NaN for an item without questions."""
    asked = [questions(m, Ability.QUESTIONS in backend.abilities) for m in metas]
    item = [i for i, qs in enumerate(asked) for _ in qs]
    out = torch.full((len(metas),), float("nan"), dtype=torch.float32)
    if item:
        p = answer_probs(backend, model, _rows(images, item), [x for qs in asked for x in qs]).float().cpu()
        idx = torch.tensor(item)
        n = torch.bincount(idx, minlength=len(metas))
        total = torch.zeros(len(metas), dtype=torch.float32).index_add_(0, idx, p)
        out = torch.where(n > 0, total / n.clamp(min=1), out)
    return out.to(codes.device)


@register_reward(
    "yes_prob",
    needs=(Ability.QUESTIONS,),
    why="it asks a free-text question, and this backend's understanding reads caption prefixes only (the toy was "
    "pretrained on captions; a QA-pretrained toy base is a later item)",
)
def yes_prob_reward(backend, model, images, codes, prompts, metas, cfg) -> torch.Tensor:
    """p(Yes) / (p(Yes) + p(No)) = sigmoid(log p(Yes) - log p(No)) -> fp32 (N,), in [0, 1]."""
    n = len(prompts)
    q = [YES_PROB_QUESTION.format(prompt=t) for t in prompts.texts]
    both = np.concatenate([images, images]) if isinstance(images, np.ndarray) else torch.cat([images, images])
    logp, mask = backend.answer_logprobs(model, both, q + q, [YES] * n + [NO] * n)
    s = (logp * mask).sum(1)
    return torch.sigmoid(s[:n] - s[n:]).float().to(codes.device)
