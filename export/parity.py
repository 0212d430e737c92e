"""Do the served files compute what the trained PEFT model computes? Next-token parity.

For each prompt (rendered by the chat template both sides share), compare the next-token
distribution of the PEFT model (reference) and of llama.cpp (served): the greedy token must
agree and ``KL(reference || served)`` in nats must stay small. Quantisation of the base weights
is the expected difference; a wrong LoRA scale or template is not.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Parity:
    prompts: int
    agreement: float          # fraction of prompts with the same greedy next token
    mean_kl: float            # nats
    max_kl: float

    def passes(self, min_agreement: float, max_mean_kl: float) -> bool:
        return self.agreement >= min_agreement and self.mean_kl <= max_mean_kl

    def describe(self) -> str:
        return (f"greedy next token agrees on {self.agreement:.0%} of {self.prompts} prompts, "
                f"mean KL {self.mean_kl:.4f} nats (max {self.max_kl:.4f})")


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.asarray(logits, dtype=np.float64) - np.max(logits)
    return shifted - np.log(np.exp(shifted).sum())


def kl_divergence(reference_logits: np.ndarray, served_logits: np.ndarray) -> float:
    """``sum p log(p / q)`` with p = softmax(reference), q = softmax(served)."""
    log_p, log_q = log_softmax(reference_logits), log_softmax(served_logits)
    return float(np.sum(np.exp(log_p) * (log_p - log_q)))


def next_token_parity(reference: Sequence[np.ndarray], served: Sequence[np.ndarray]) -> Parity:
    if len(reference) != len(served) or not reference:
        raise ValueError("parity needs the same, non-zero number of reference and served distributions")
    kls = [kl_divergence(r, s) for r, s in zip(reference, served, strict=True)]
    agree = [int(np.argmax(r)) == int(np.argmax(s)) for r, s in zip(reference, served, strict=True)]
    return Parity(len(kls), sum(agree) / len(agree), float(np.mean(kls)), float(np.max(kls)))


def peft_next_token_logits(model, tokenizer, prompts: Sequence[str], chat) -> list[np.ndarray]:
    """The PEFT model's next-token logits after each prompt rendered with ``chat``."""
    import torch

    out = []
    model.eval()
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer(chat.render(prompt), add_special_tokens=False, return_tensors="pt").input_ids
            out.append(model(input_ids=ids.to(model.device)).logits[0, -1].double().cpu().numpy())
    return out
