"""Do the served files compute what the trained PEFT model computes? Next-token parity.

For each prompt (rendered by the chat template both sides share), compare the next-token
distribution of the PEFT model (reference) and of llama.cpp (served): the greedy token must
agree and ``KL(reference || served)`` in nats must stay small. Quantisation of the base weights
is the expected difference; a wrong LoRA scale or template is not.

Agreement is tie-aware: where the reference's two best tokens are nearly tied, 4-bit rounding of
the base can legitimately flip the greedy choice, so a served token counts as agreeing when the
reference gives it a log-probability within ``tie_margin`` nats of its own best (measured on the
default run: the only flips were 0.05-0.06 nats; a wrong scale moves the whole distribution,
KL 0.15 nats, and fails on KL regardless). The exact agreement is reported too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Parity:
    prompts: int
    agreement: float          # fraction of prompts whose served greedy token is the reference's, up to a near-tie
    mean_kl: float            # nats
    max_kl: float
    exact_agreement: float    # fraction with exactly the same greedy token

    def passes(self, min_agreement: float, max_mean_kl: float) -> bool:
        return self.agreement >= min_agreement and self.mean_kl <= max_mean_kl

    def describe(self) -> str:
        return (f"greedy next token agrees on {self.agreement:.0%} of {self.prompts} prompts "
                f"({self.exact_agreement:.0%} exactly), mean KL {self.mean_kl:.4f} nats (max {self.max_kl:.4f})")


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.asarray(logits, dtype=np.float64) - np.max(logits)
    return shifted - np.log(np.exp(shifted).sum())


def kl_divergence(reference_logits: np.ndarray, served_logits: np.ndarray) -> float:
    """``sum p log(p / q)`` with p = softmax(reference), q = softmax(served)."""
    log_p, log_q = log_softmax(reference_logits), log_softmax(served_logits)
    return float(np.sum(np.exp(log_p) * (log_p - log_q)))


def greedy_agrees(reference_logits: np.ndarray, served_logits: np.ndarray, tie_margin: float) -> bool:
    """The served greedy token is the reference's, or within ``tie_margin`` nats of it under the
    reference (a near-tie)."""
    log_p = log_softmax(reference_logits)
    return bool(log_p.max() - log_p[int(np.argmax(served_logits))] <= tie_margin)


def next_token_parity(reference: Sequence[np.ndarray], served: Sequence[np.ndarray],
                      tie_margin: float = 0.1) -> Parity:
    if len(reference) != len(served) or not reference:
        raise ValueError("parity needs the same, non-zero number of reference and served distributions")
    pairs = list(zip(reference, served, strict=True))
    kls = [kl_divergence(r, s) for r, s in pairs]
    agree = [greedy_agrees(r, s, tie_margin) for r, s in pairs]
    exact = [int(np.argmax(r)) == int(np.argmax(s)) for r, s in pairs]
    return Parity(len(kls), sum(agree) / len(agree), float(np.mean(kls)), float(np.max(kls)), sum(exact) / len(exact))


def peft_next_token_logits(model, tokenizer, prompts: Sequence[str], chat, batch_size: int = 16) -> list[np.ndarray]:
    """The PEFT model's next-token logits after each prompt rendered with ``chat``. Prompts run in
    right-padded batches, and only each prompt's last real position is projected onto the
    vocabulary."""
    import torch

    from trainers.data.formatting import batches_by_length, last_position_forward

    out: list[np.ndarray | None] = [None] * len(prompts)
    model.eval()
    with torch.no_grad():
        for indices, ids, mask in batches_by_length([chat.render(p) for p in prompts], tokenizer, False,
                                                    model.device, batch_size):
            _, logits = last_position_forward(model, ids, mask)
            for index, row in zip(indices, logits.double().cpu().numpy(), strict=True):
                out[index] = row
    return out
