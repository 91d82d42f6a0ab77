"""The toy backend's understanding branch writing captions (Ability.CAPTION; gvu/toy/backend.py ToyUMM.caption)."""

from __future__ import annotations

import torch

from gvu.models import backbone_and_head, gathered, unwrap


@torch.no_grad()
def caption(backend, model, images, greedy: bool = True, max_words: int = 16, generator=None) -> list[str]:
    """Understanding branch writing a prompt for each image: uint8 (N, 96, 96, 3) -> N strings.

    Decoding is restricted to the words and <eos> (greedy, or sampled at temperature 1).
    """
    from transformers import DynamicCache

    body, head = backbone_and_head(model)
    dev = next(unwrap(model).parameters()).device
    codes = backend.encode(images).to(dev)
    ids = backend._understanding_prefix(codes)
    n = ids.shape[0]
    allowed = torch.cat([backend.word_ids, torch.tensor([backend.eos])]).to(dev)
    cache = DynamicCache()
    h = body(input_ids=ids, past_key_values=cache, use_cache=True).last_hidden_state[:, -1]
    pos = ids.shape[1]
    out = torch.full((n, max_words), backend.eos, dtype=torch.long, device=dev)
    done = torch.zeros(n, dtype=torch.bool, device=dev)
    with gathered(head.weight):
        w = head.weight[allowed]
        for t in range(max_words):
            logits = torch.nn.functional.linear(h, w).float()
            k = logits.argmax(-1) if greedy else torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]
            tok = torch.where(done, torch.full_like(k, backend.eos), allowed[k])
            out[:, t] = tok
            done |= tok == backend.eos
            if bool(done.all()):
                break
            h = body(
                input_ids=tok[:, None],
                position_ids=torch.full((n, 1), pos, device=dev),
                past_key_values=cache,
                use_cache=True,
            ).last_hidden_state[:, -1]
            pos += 1
    texts = []
    for row in out.tolist():
        words = row[: row.index(backend.eos)] if backend.eos in row else row
        texts.append(backend.tokenizer.decode(words, skip_special_tokens=True))
    return texts
