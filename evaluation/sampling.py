"""Sampled replies whose randomness belongs to the prompt, not to the run.

A greedy reply flips whenever two next tokens nearly tie, so a judged greedy refusal rate moves
with float noise (another CPU's kernels, a 1e-5 change of the adapter). The refusal figures are
therefore read from ``samples`` sampled replies per prompt, judged, averaged: a per-prompt rate
in steps of 1/samples. Each reply draws its tokens by inverse-CDF sampling with uniforms of its
own (a generator seeded by ``seed``, the prompt's text and the sample's index), so a reply does
not depend on the batch it ran in, on the other prompts, or on the machine's RNG; a small change
of the weights moves a token only when a uniform falls within that change of a CDF step.

Generation is batched: prompts run right-padded in batches of similar length, each prompt's
key/value cache is repeated for its samples, and every sequence decodes one token per forward.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
import torch

from trainers.data.formatting import batches_by_length, last_position_forward

BATCH = 8     # prompts per batch; times ``samples`` sequences decode together


def uniforms(seed: int, prompt: str, sample: int, steps: int) -> np.ndarray:
    """The ``steps`` uniforms that draw the tokens of reply ``sample`` to ``prompt``."""
    return np.random.default_rng([seed, zlib.crc32(prompt.encode()), sample]).random(steps)


def inverse_cdf(logits: torch.Tensor, u: torch.Tensor, temperature: float) -> torch.Tensor:
    """[rows] token ids: row i takes the first token whose cumulative probability (at
    ``temperature``) exceeds ``u[i]``."""
    cdf = torch.softmax(logits.double() / temperature, dim=-1).cumsum(dim=-1)
    picked = torch.searchsorted(cdf, (u.double() * cdf[:, -1])[:, None]).squeeze(1)
    return picked.clamp(max=logits.shape[-1] - 1)


def stop_ids(tokenizer, chat) -> set[int]:
    """End of turn: the chat format's stop strings that are single tokens, and EOS."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for stop in chat.stops:
        encoded = tokenizer(stop, add_special_tokens=False).input_ids
        if len(encoded) == 1:
            ids.add(encoded[0])
    return ids


@torch.no_grad()
def sampled_replies(model, tokenizer, prompts: Sequence[str], chat, samples: int, max_new_tokens: int,
                    temperature: float, seed: int) -> list[list[str]]:
    """[prompt][sample] reply texts (module docstring)."""
    if samples < 1 or max_new_tokens < 1 or temperature <= 0:
        raise ValueError("samples and max_new_tokens must be positive, temperature above 0")
    model.eval()
    stops = torch.tensor(sorted(stop_ids(tokenizer, chat)), device=model.device)
    out: list[list[str]] = [[] for _ in prompts]
    for indices, heads, mask_head in batches_by_length([chat.render(p) for p in prompts], tokenizer, False,
                                                       model.device, BATCH):
        rows = len(indices) * samples                                  # row b * samples + k
        draws = torch.tensor(np.stack([uniforms(seed, prompts[i], k, max_new_tokens)
                                       for i in indices for k in range(samples)]), device=model.device)
        first, logits = last_position_forward(model, heads, mask_head, use_cache=True)
        cache = first.past_key_values
        cache.batch_repeat_interleave(samples)
        mask = mask_head.repeat_interleave(samples, dim=0)
        # New tokens take the positions right after each prompt's real tokens (the pads between
        # are masked), so a reply is what its prompt alone would give.
        position = mask_head.sum(dim=1).repeat_interleave(samples)
        logits = logits.repeat_interleave(samples, dim=0)
        tokens = torch.zeros((rows, max_new_tokens), dtype=torch.long, device=model.device)
        finished = torch.zeros(rows, dtype=torch.bool, device=model.device)
        length = torch.full((rows,), max_new_tokens, device=model.device)
        for step in range(max_new_tokens):
            token = inverse_cdf(logits, draws[:, step], temperature)
            tokens[:, step] = token
            ended = ~finished & torch.isin(token, stops)
            length = torch.where(ended, torch.full_like(length, step), length)
            finished |= ended
            if bool(finished.all()) or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones((rows, 1), dtype=mask.dtype, device=mask.device)], dim=1)
            logits = model(input_ids=token[:, None], attention_mask=mask, position_ids=(position + step)[:, None],
                           past_key_values=cache).logits[:, -1]
        for row in range(rows):
            text = tokenizer.decode(tokens[row, :int(length[row])].tolist(), skip_special_tokens=True)
            out[indices[row // samples]].append(text.strip())
    return out


# What float noise may do to a judged sampled rate: a 1e-5 change of the adapter moves it by at
# most this much (tests/evaluation/test_refusal_stability.py builds a greedy near-tie to check).
FLOAT_NOISE_TOLERANCE = 0.02
