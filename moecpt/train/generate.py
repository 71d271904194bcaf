"""Text sampling from a trained model: temperature and nucleus (top-p) sampling (Holtzman et al. 2020)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from moecpt.errors import MoecptError


@torch.no_grad()
def sample(model, prompt_ids: list[int], max_new_tokens: int = 64, temperature: float = 0.8, top_p: float = 0.95,
           eod_id: int | None = None, seed: int | None = None,
           stop: Callable[[list[int]], bool] | None = None) -> list[int]:
    """Autoregressively extend ``prompt_ids``.

    Args:
        model: a :class:`moecpt.model.transformer.Transformer` (its forward gives logits ``[B, T, V]``).
        prompt_ids: token ids of the prompt (at least one).
        max_new_tokens: tokens to generate at most; stops early at ``eod_id``.
        temperature: > 0; 0 means greedy.
        top_p: nucleus mass in (0, 1].
        seed: seeds a private generator (reproducible samples).
        stop: called with the ids generated so far after each new token; ``True`` ends the sample there (e.g. a
            stop string appeared in the decoded text: the lm-evaluation-harness adapter's ``until``).

    Returns:
        the generated ids (prompt excluded). The context is truncated to the model's ``max_seq_len`` (its RoPE
        positions); within it a model with sliding-window layers attends within its window
        (:mod:`moecpt.model.attention_ops`), as transformers does.

    Raises:
        MoecptError: empty prompt or out-of-range sampling parameters.
    """
    if not prompt_ids:
        raise MoecptError("the prompt encodes to no tokens; give a non-empty --prompt")
    if not math.isfinite(temperature) or temperature < 0:
        raise MoecptError(f"--temperature {temperature} must be a finite number >= 0 (0 = greedy)")
    if not 0 < top_p <= 1:
        raise MoecptError(f"--top-p {top_p} must be in (0, 1]")
    device = next(model.parameters()).device
    gen = torch.Generator(device=device)
    if seed is not None:
        gen.manual_seed(seed)
    model.eval()
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    out: list[int] = []
    for _ in range(max_new_tokens):
        logits_V = model(ids[:, -model.cfg.max_seq_len:])[0, -1].float()
        if temperature == 0:
            nxt = int(logits_V.argmax())
        else:
            probs_V = torch.softmax(logits_V / temperature, dim=-1)
            sorted_p, sorted_i = probs_V.sort(descending=True)
            keep = sorted_p.cumsum(0) - sorted_p < top_p  # always keeps the most likely token
            sorted_p = sorted_p * keep
            nxt = int(sorted_i[torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=gen)])
        out.append(nxt)
        if (eod_id is not None and nxt == eod_id) or (stop is not None and stop(out)):
            break
        ids = torch.cat([ids, torch.tensor([[nxt]], device=device)], dim=1)
    return out
