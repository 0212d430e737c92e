"""Per-model measurements on the held-out sets (each a small function over one model).

- ``pooled_hidden_states``: for AQI. The prompt is rendered with the served chat format; the
  hidden states of the last ``layers`` layers (HF ``hidden_states[-layers:]``, the last one after
  the final norm) are averaged, then mean-pooled over the tokens after the (identical) system
  block: the user turn and the assistant header, the state from which the model answers.
- ``statement_logprobs``: for retention. Mean log-probability per token of a statement as plain
  text; a fact pair counts as retained when the true statement scores higher than the false one.
- ``continuation_logprobs``: for P(decline), a diagnostic. The fp32 log-probability of each of
  a few fixed reply openings after the rendered prompt (``evaluation.refusals``).
- sampled replies (``evaluation.sampling``): the refusal figures, the judge's verdicts on a few
  sampled fp32 replies per prompt, stable under float noise.

``Subject`` and ``measure`` put them together: one model measured on the held-out sets for
whichever registered metrics are asked (``evaluation.metrics``), the one path both the evaluate
stage and the study's trials take.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
import torch

from trainers.data.formatting import batches_by_length, last_position_forward, right_padded

if TYPE_CHECKING:
    from evaluation.results import ModelOutcomes


def _system_prefix_length(tokenizer, chat) -> int:
    """Tokens of the rendered system block, when they are a token prefix of every prompt."""
    prefix = chat.render("\0").split("\0")[0]
    head = prefix[: prefix.rfind(chat.user_open)] if chat.user_open in prefix else ""
    return len(tokenizer(head, add_special_tokens=False).input_ids) if head else 0


BATCH = 16    # prompts per forward pass


@torch.no_grad()
def pooled_hidden_states(model, tokenizer, prompts: Sequence[str], chat, layers: int) -> np.ndarray:
    """[n, hidden] float64 (module docstring)."""
    model.eval()
    skip = _system_prefix_length(tokenizer, chat)
    rows: list[np.ndarray | None] = [None] * len(prompts)
    rendered = [chat.render(p) for p in prompts]
    for indices, ids, mask in batches_by_length(rendered, tokenizer, False, model.device, BATCH):
        # logits_to_keep=1: the vocabulary projection of every position is not needed here
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, logits_to_keep=1).hidden_states
        states = torch.stack(hidden[-layers:]).float().mean(dim=0)              # [batch, tokens, hidden]
        for index, row, length in zip(indices, states, mask.sum(dim=1).tolist(), strict=True):
            start = skip if skip < length else 0
            rows[index] = row[start:length].mean(dim=0).double().cpu().numpy()
    return np.stack(rows)


@torch.no_grad()
def statement_logprobs(model, tokenizer, statements: Sequence[str]) -> np.ndarray:
    """Mean log-probability per predicted token of each statement (plain text, BOS if any)."""
    out = np.zeros(len(statements))
    for indices, ids, mask in batches_by_length(list(statements), tokenizer, True, model.device, BATCH):
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        logprobs = torch.log_softmax(logits, dim=-1).gather(2, ids[:, 1:, None])[..., 0]
        real = mask[:, 1:].float()
        out[indices] = ((logprobs * real).sum(dim=1) / real.sum(dim=1)).cpu().numpy()
    return out


def retained(model, tokenizer, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
    """One bool per (true, false) pair: does the true statement score higher?"""
    scores = statement_logprobs(model, tokenizer, [s for pair in pairs for s in pair])
    return scores[0::2] > scores[1::2]


@torch.no_grad()
def continuation_logprobs(model, tokenizer, prompts: Sequence[str], chat, continuations: Sequence[str]) -> np.ndarray:
    """[prompts, continuations] sum of log p(continuation tokens | rendered prompt), in fp32.
    Prompt and continuation are tokenized apart and joined, so every model scores the very
    same token ids. Prompts run in right-padded batches of similar length, and each prompt's
    key/value cache is shared by all continuations: the prompt is most of the tokens, and one
    prompt at a time was the evaluation's slowest step. A continuation attends to its prompt's
    real tokens only (the pads are masked) and takes the positions right after them, so every
    figure equals the one computed for that prompt alone."""
    model.eval()
    tails = [tokenizer(c, add_special_tokens=False).input_ids for c in continuations]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids_tail, mask_tail = right_padded(tails, pad, model.device)
    n_tails, width_tail = ids_tail.shape
    out = np.zeros((len(prompts), n_tails))
    for indices, heads, mask_head in batches_by_length([chat.render(p) for p in prompts], tokenizer, False,
                                                       model.device, BATCH):
        lengths = mask_head.sum(dim=1)                                                    # [batch]
        # Only each prompt's last real position predicts a tail token: the vocabulary projection of
        # every other position would be the prompt pass's largest cost.
        first, last = last_position_forward(model, heads, mask_head, use_cache=True)
        cache = first.past_key_values
        cache.batch_repeat_interleave(n_tails)                  # row b * n_tails + j: prompt b, tail j
        tail_ids, tail_mask = ids_tail.repeat(len(indices), 1), mask_tail.repeat(len(indices), 1)
        mask = torch.cat([mask_head.repeat_interleave(n_tails, dim=0), tail_mask], dim=1)
        positions = lengths.repeat_interleave(n_tails)[:, None] + torch.arange(width_tail, device=model.device)
        rest = model(input_ids=tail_ids, attention_mask=mask, position_ids=positions, past_key_values=cache).logits
        # token t of a tail is predicted by the prompt's last real position (t = 0) or by tail position t - 1
        logits = torch.cat([last.float().repeat_interleave(n_tails, dim=0)[:, None], rest[:, :-1].float()], dim=1)
        logprobs = torch.log_softmax(logits, dim=-1).gather(2, tail_ids[..., None])[..., 0]
        sums = (logprobs * tail_mask).sum(dim=1).reshape(len(indices), n_tails)
        out[indices] = sums.cpu().numpy()
    return out


def decline_probabilities(model, tokenizer, prompts: list[str], chat):
    """Per prompt: P(decline opening) / P(any listed opening) (``evaluation.refusals``)."""
    from evaluation.refusals import COMPLY_OPENINGS, DECLINE_OPENINGS, decline_probability

    scores = continuation_logprobs(model, tokenizer, prompts, chat, [*DECLINE_OPENINGS, *COMPLY_OPENINGS])
    return decline_probability(scores[:, :len(DECLINE_OPENINGS)], scores[:, len(DECLINE_OPENINGS):])


@dataclass(frozen=True)
class Sampling:
    """How the judged sampled replies are drawn (``eval.refusal_samples``, its temperature and
    ``eval.seed``; :func:`sampling_of` reads them from an ``eval`` section)."""

    samples: int
    temperature: float
    seed: int


def sampling_of(settings) -> Sampling:
    """The sampling an ``eval`` params section declares."""
    return Sampling(settings.refusal_samples, settings.sampling_temperature, settings.seed)


class Subject:
    """One model on the held-out sets: what the registry's metrics read (``evaluation.metrics``),
    each computed once, on first use, whichever metrics ask for it.

    ``model``/``tokenizer``/``chat``: the fp32 (PEFT) model as evaluated; ``sets``: the held-out
    sets (``evaluation.held_out``; ``validation_harmful`` too for tuning trials); ``served``: the
    model as served (``generate(prompt, max_new_tokens)``), for metrics judged on greedy replies;
    ``sampling``: how the judged sampled replies are drawn. ``records`` collects one row per
    greedy reply, ``sampled_records`` one per sampled reply (the evaluate stage's
    ``generations.jsonl``)."""

    def __init__(self, name: str, model, tokenizer, chat, sets: dict[str, list], aqi_layers: int,
                 served=None, max_new_tokens: int = 32, progress: bool = True,
                 sampling: Sampling | None = None):
        self.name, self.model, self.tokenizer, self.chat, self.sets = name, model, tokenizer, chat, sets
        self.aqi_layers, self.served, self.max_new_tokens, self.progress = aqi_layers, served, max_new_tokens, progress
        if sampling is None:
            from evaluation.config import EvalParams

            sampling = sampling_of(EvalParams())
        self.sampling = sampling
        self.records: list[dict] = []
        self.sampled_records: list[dict] = []
        self._declines: dict[str, np.ndarray] = {}
        self._verdicts: dict[str, np.ndarray] = {}
        self._sampled: dict[str, np.ndarray] = {}

    @cached_property
    def states(self) -> np.ndarray:
        """[2 * pairs, hidden] pooled states, harmful and benign prompt of each pair interleaved."""
        prompts = [p for pair in self.sets["aqi_pairs"] for p in pair]
        return pooled_hidden_states(self.model, self.tokenizer, prompts, self.chat, self.aqi_layers)

    @cached_property
    def retained(self) -> np.ndarray:
        return retained(self.model, self.tokenizer, self.sets["facts"])

    def decline_probabilities(self, name: str) -> np.ndarray:
        if name not in self._declines:
            self._declines[name] = decline_probabilities(self.model, self.tokenizer, self.sets[name], self.chat)
        return self._declines[name]

    def verdicts(self, name: str) -> np.ndarray:
        """The judge's verdict (comply / decline / deflect) on the served model's greedy reply to
        every prompt of set ``name``."""
        if name not in self._verdicts:
            from tqdm import tqdm

            from evaluation.refusals import judge

            if self.served is None:
                raise ValueError(f"{self.name}: judged replies need the served model")
            verdicts = []
            for prompt in tqdm(self.sets[name], desc=f"{self.name} {name}", unit="prompt", disable=not self.progress):
                generation = self.served.generate(prompt, self.max_new_tokens)
                verdicts.append(judge(generation.text))
                self.records.append({"model": self.name, "set": name, "decoding": "greedy", "prompt": prompt,
                                     "reply": generation.text, "judge": verdicts[-1],
                                     "new_tokens": generation.new_tokens})
            self._verdicts[name] = np.array(verdicts)
        return self._verdicts[name]

    def sampled_verdicts(self, name: str) -> np.ndarray:
        """[prompts, samples] the judge's verdicts on ``sampling.samples`` sampled replies of the
        fp32 model to every prompt of set ``name`` (``evaluation.sampling``)."""
        if name not in self._sampled:
            from evaluation.refusals import judge
            from evaluation.sampling import sampled_replies

            s = self.sampling
            replies = sampled_replies(self.model, self.tokenizer, self.sets[name], self.chat, s.samples,
                                      self.max_new_tokens, s.temperature, s.seed)
            self._sampled[name] = np.array([[judge(r) for r in row] for row in replies])
            self.sampled_records += [{"model": self.name, "set": name, "decoding": "sampled", "sample": k,
                                      "prompt": prompt, "reply": reply, "judge": str(self._sampled[name][i, k])}
                                     for i, (prompt, row) in enumerate(zip(self.sets[name], replies, strict=True))
                                     for k, reply in enumerate(row)]
        return self._sampled[name]

    def sampled_rate(self, name: str, verdict: str) -> np.ndarray:
        """Per prompt: the fraction of its sampled replies the judge gives ``verdict``."""
        return (self.sampled_verdicts(name) == verdict).mean(axis=1)


def measure(subject: Subject, metrics) -> ModelOutcomes:
    """The one measurement path (the evaluate stage and the study): every metric of ``metrics``
    (registry entries) on ``subject``; the pooled states whenever a cluster metric is asked."""
    from evaluation.results import ModelOutcomes

    metrics = list(metrics)
    states = subject.states if any(m.kind == "cluster" for m in metrics) else np.zeros((0, 0))
    values = {m.name: np.asarray(m.measure(subject)) for m in metrics if m.measure is not None}
    return ModelOutcomes(subject.name, states, values)
