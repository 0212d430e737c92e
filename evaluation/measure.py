"""Per-model measurements on the held-out sets (each a small function over one model).

- ``pooled_hidden_states``: for AQI. The prompt is rendered with the served chat format; the
  hidden states of the last ``layers`` layers (HF ``hidden_states[-layers:]``, the last one after
  the final norm) are averaged, then mean-pooled over the tokens after the (identical) system
  block: the user turn and the assistant header, the state from which the model answers.
- ``statement_logprob``: for retention. Mean log-probability per token of a statement as plain
  text; a fact pair counts as retained when the true statement scores higher than the false one.
- ``generations``: greedy replies through a serving backend (refusals, speed).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def _system_prefix_length(tokenizer, chat) -> int:
    """Tokens of the rendered system block, when they are a token prefix of every prompt."""
    prefix = chat.render("\0").split("\0")[0]
    head = prefix[: prefix.rfind(chat.user_open)] if chat.user_open in prefix else ""
    return len(tokenizer(head, add_special_tokens=False).input_ids) if head else 0


@torch.no_grad()
def pooled_hidden_states(model, tokenizer, prompts: Sequence[str], chat, layers: int) -> np.ndarray:
    """[n, hidden] float64 (module docstring)."""
    model.eval()
    skip = _system_prefix_length(tokenizer, chat)
    rows = []
    for prompt in prompts:
        ids = tokenizer(chat.render(prompt), add_special_tokens=False, return_tensors="pt").input_ids.to(model.device)
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
        states = torch.stack(hidden[-layers:]).float().mean(dim=0)[0]    # [tokens, hidden]
        start = skip if skip < states.shape[0] else 0
        rows.append(states[start:].mean(dim=0).double().cpu().numpy())
    return np.stack(rows)


@torch.no_grad()
def statement_logprob(model, tokenizer, statement: str) -> float:
    ids = tokenizer(statement, return_tensors="pt").input_ids.to(model.device)
    logits = model(input_ids=ids).logits[0, :-1].float()
    logprobs = torch.log_softmax(logits, dim=-1).gather(1, ids[0, 1:, None])[:, 0]
    return float(logprobs.mean())


def retained(model, tokenizer, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
    """One bool per (true, false) pair: does the true statement score higher?"""
    return np.array([statement_logprob(model, tokenizer, t) > statement_logprob(model, tokenizer, f)
                     for t, f in pairs])
