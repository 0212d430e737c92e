"""Served speed of each variant against the base, measured side by side.

Timing models one after another on a shared, noisy machine confounds the model with whatever the
machine was doing at the time. Here every model runs the same prompt ids for the same number of
decode steps, interleaved within each round and in a rotating order, and each model is compared
with the reference on the same round and prompt; the stored figure is the median of those paired
ratios, which a slow spell hitting both models of a pair leaves unchanged.

The base is served from its own file (the package's Q4_1 for the embedded default) and the
variants merged in ``export.merged_quantization`` (Q8_0): a ratio to the base as served mixes the
file format with the adapter. So the base in the variants' format is timed beside them too, and
the ``_same_format`` ratios to it isolate what the adapter costs (nothing, for a merged file).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from statistics import median
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from export.served import ServeManifest


@dataclass(frozen=True)
class SpeedSettings:
    new_tokens: int = 64     # decode steps per measurement, the same for every model
    rounds: int = 3          # >= number of models, so each model leads at least one round

    def __post_init__(self) -> None:
        if self.new_tokens < 1 or self.rounds < 1:
            raise ValueError("new_tokens and rounds must be positive")


@dataclass(frozen=True)
class Timing:
    prompt_ids: tuple[int, ...]   # as the Llama recorded them, to check that pairs saw one prompt
    new_tokens: int               # decode steps, from llama.cpp's own token count
    prefill_tokens_per_second: float
    decode_tokens_per_second: float


def time_one(llm, tokens: list[int], new_tokens: int) -> Timing:
    """Prefill ``tokens`` in one call, then exactly ``new_tokens`` greedy decode steps on ``llm``."""
    if len(tokens) + new_tokens > llm.n_ctx():
        raise ValueError(f"{len(tokens)} prompt + {new_tokens} new tokens exceed the context of {llm.n_ctx()}")
    n_vocab = llm.n_vocab()
    llm.reset()
    start = time.perf_counter()
    llm.eval(tokens)
    prefilled = time.perf_counter()
    for _ in range(new_tokens):
        # Only the last position's logits exist (logits_all=False leaves llm.scores unfilled). No
        # stop at end-of-turn: a model that would stop early must still decode as many tokens.
        logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))
        llm.eval([int(logits.argmax())])
    decoded = time.perf_counter()
    return Timing(prompt_ids=tuple(int(t) for t in llm.input_ids[:len(tokens)]),
                  new_tokens=llm.n_tokens - len(tokens),
                  prefill_tokens_per_second=len(tokens) / (prefilled - start),
                  decode_tokens_per_second=new_tokens / (decoded - prefilled))


def rotation(names: list[str], round_index: int) -> list[str]:
    """The measuring order in a round: shifted by one each round, so no model always goes first."""
    shift = round_index % len(names)
    return names[shift:] + names[:shift]


def side_by_side(models: dict[str, object], prompts: list[str], new_tokens: int, rounds: int,
                 reference: str = "base") -> dict[str, dict[str, list]]:
    """Per model, lists indexed alike by (round, prompt): ``prefill`` and ``decode`` tokens/s,
    ``new_tokens`` decoded and the ``prompt_ids`` evaluated."""
    # One tokenization for all: the variants share the base's tokenizer, and a chat-template or
    # BOS difference would otherwise change the prompt length being timed.
    token_lists = [models[reference].prompt_tokens(p) for p in prompts]
    names = list(models)
    for name in names:
        # Untimed: the first run pages in the mmapped weights and would penalise whoever goes first.
        time_one(models[name].llm, token_lists[0], min(new_tokens, 4))
    out: dict[str, dict[str, list]] = {n: {"prefill": [], "decode": [], "new_tokens": [], "prompt_ids": []}
                                       for n in names}
    for round_index in range(rounds):
        for tokens in token_lists:
            for name in rotation(names, round_index):
                timing = time_one(models[name].llm, tokens, new_tokens)
                out[name]["prefill"].append(timing.prefill_tokens_per_second)
                out[name]["decode"].append(timing.decode_tokens_per_second)
                out[name]["new_tokens"].append(timing.new_tokens)
                out[name]["prompt_ids"].append(timing.prompt_ids)
    return out


def paired_median_ratio(values: list[float], reference: list[float]) -> float:
    """Median of value/reference over pairs measured together (same round and prompt)."""
    if not values or len(values) != len(reference):
        raise ValueError(f"need equally many paired measurements, got {len(values)} and {len(reference)}")
    return median(v / r for v, r in zip(values, reference, strict=True))


def speed_ratios(rates: dict[str, dict[str, list[float]]], reference: str = "base") -> dict[str, dict[str, float]]:
    """For every model but ``reference``: paired median decode and prefill ratios to it, the number
    of pairs ``n``, and the medians in tokens/s of the model and of the reference."""
    ref = rates[reference]
    return {
        name: {
            "decode_ratio": paired_median_ratio(own["decode"], ref["decode"]),
            "prefill_ratio": paired_median_ratio(own["prefill"], ref["prefill"]),
            "n": len(own["decode"]),
            "decode_tokens_per_second": median(own["decode"]),
            "prefill_tokens_per_second": median(own["prefill"]),
            "reference_decode_tokens_per_second": median(ref["decode"]),
            "reference_prefill_tokens_per_second": median(ref["prefill"]),
        }
        for name, own in rates.items() if name != reference
    }


# The speed reference's key among the timed models: the base in the merged variants' format
# (the serve manifest's ``speed_reference``); it is timed, not stored as a model.
SAME_FORMAT = "base in the variants' format"


def speed_figures(rates: dict[str, dict[str, list[float]]], keys: list[str],
                  same_format: str | None = None) -> dict[str, dict[str, tuple[float, int]]]:
    """model -> metric -> (value, pairs) for ``keys``: median decode and prefill tokens/s, each
    variant's paired median ratios to the base as served (``delta_speed_decode``,
    ``delta_speed_prefill``) and, where ``same_format`` names a timed reference, every model's
    ratios to it (``..._same_format``; the base's own says what its file format gains)."""
    as_served = speed_ratios({key: rates[key] for key in keys})
    same = speed_ratios(rates, same_format) if same_format else {}
    out: dict[str, dict[str, tuple[float, int]]] = {}
    for key in keys:
        n = len(rates[key]["decode"])
        out[key] = {"decode_tokens_per_second": (median(rates[key]["decode"]), n),
                    "prefill_tokens_per_second": (median(rates[key]["prefill"]), n)}
        for ratios, suffix in ((as_served, ""), (same, "_same_format")):
            if key in ratios:
                out[key] |= {f"delta_speed_decode{suffix}": (ratios[key]["decode_ratio"], n),
                             f"delta_speed_prefill{suffix}": (ratios[key]["prefill_ratio"], n)}
    return out


def served_speed(manifest: ServeManifest, keys: list[str], settings) -> dict[str, dict[str, tuple[float, int]]]:
    """Decode and prefill tokens/s of every served model, measured side by side with the base
    and, when the variants are served merged in another file format than the base's, with the
    base in their format (the manifest's ``speed_reference``): ``speed_figures``, through
    llama.cpp (Ollama's own counters are ``evaluation.ollama_backend``'s)."""
    from evaluation.serving import open_served
    from export.backend import LlamaCppModel

    models = {key: open_served(manifest, key) for key in keys}
    reference = manifest.speed_reference
    if reference:
        models[SAME_FORMAT] = LlamaCppModel(reference.gguf, manifest.chat)
    try:
        rates = side_by_side(models, list(SPEED_PROMPTS[:settings.speed_prompts]), settings.speed_new_tokens,
                             settings.speed_rounds)
    finally:
        for served in models.values():
            served.close()
    return speed_figures(rates, keys, SAME_FORMAT if reference else None)


# Fixed, ordinary prompts of different lengths for speed (the content does not matter: every
# model decodes the same number of tokens whatever it would answer).
SPEED_PROMPTS = ("What is the capital of France?",
                  "Explain in a few sentences how a refrigerator keeps food cold, and why the back of it is warm.",
                  "Write a short poem about the sea.",
                  "List three differences between a virus and a bacterium, and say which of them antibiotics treat "
                  "and why that matters for how doctors prescribe them in winter.",
                  "How do I boil an egg?", "Summarise the plot of Romeo and Juliet in two sentences.",
                  "Why is the sky blue?", "Give me a recipe for a simple tomato sauce.")
