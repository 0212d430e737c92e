"""The evaluation's second serving backend: every served model through a real Ollama server.

The evaluation's own figures of greedy served replies come from llama.cpp in-process
(``evaluation.serving``). Beside them, this module asks Ollama, the server users meet through
``ollama run <name>``, the same prompts with the same greedy options (``export.decoding``):

- a private server (the build ``make setup`` made, ``export.ollama_build``) on a loopback port,
  CPU only, its own model store in a scratch folder, stopped afterwards;
- each served model registered through the real CLI from the Modelfiles the export wrote, once
  per form asked for (``eval.ollama_forms``: ``FROM`` base + ``ADAPTER``, and the merged GGUF; the
  base once), named ``<model key>:<form>``, and checked to hold exactly the greedy options;
- the registry's served metrics (``evaluation.metrics``: explicit refusals, non-answers,
  over-refusals) judged on Ollama's replies, their agreement with llama.cpp's replies to the same
  prompts (``evaluation.agreement``), and decode/prefill speed pooled over those replies from
  Ollama's own counters (``eval_count``/``eval_duration``, ``prompt_eval_count``/``prompt_eval_duration``).

The merged form is the same file llama.cpp evaluated (an engine-against-engine reading); the
adapter form adds the difference between applying the LoRA at run time and merging it.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from evaluation.agreement import Agreement, reply_agreement
from evaluation.metrics import AGREEMENT_FIELDS, agreement_metric
from evaluation.stats import wilson_interval
from export.served import ServeManifest

# The Modelfile the export wrote for each form of a variant (``pipelines/export.py``).
MODELFILES = {"adapter": "Modelfile", "merged": "Modelfile.merged"}
BACKEND = "ollama"


def ollama_name(key: str, form: str) -> str:
    """The private server's name of one form of one model: ``<key>:<form>`` (a tag per form)."""
    return f"{key}:{form}"


def modelfiles(manifest: ServeManifest, key: str, forms: Sequence[str]) -> dict[str, Path]:
    """Form -> Modelfile of model ``key``: the base has one form (``base``); a variant each form of
    ``forms`` whose Modelfile its export wrote (a merged form only where a merged GGUF exists)."""
    entry = manifest.models[key]
    if key == "base":
        return {"base": entry.modelfile}
    folder = entry.adapter_gguf.parent
    return {form: folder / MODELFILES[form] for form in forms
            if (folder / MODELFILES[form]).is_file() and (form != "merged" or entry.merged_gguf)}


class Recording:
    """A served model that keeps every generation it returns (their speed counters)."""

    def __init__(self, served) -> None:
        self.served, self.generations = served, []

    def generate(self, prompt: str, max_new_tokens: int):
        generation = self.served.generate(prompt, max_new_tokens)
        self.generations.append(generation)
        return generation

    def close(self) -> None:
        self.served.close()


def pooled_rate(counts: Sequence[int], rates: Sequence[float | None]) -> float | None:
    """Tokens per second over several generations: all their tokens over all their time (each
    generation's time is its count over its rate); None when nothing was timed."""
    timed = [(n, n / r) for n, r in zip(counts, rates, strict=True) if n and r]
    seconds = sum(s for _, s in timed)
    return sum(n for n, _ in timed) / seconds if seconds > 0 else None


def pooled_speed(generations) -> dict[str, tuple[float, int]]:
    """The registry's Ollama speed figures over ``generations`` (``export.backend.Generation``):
    decode and prefill tokens/s, with the number of generations."""
    out = {}
    for name, count, rate in (("ollama_decode_tokens_per_second", "new_tokens", "decode_tokens_per_second"),
                              ("ollama_prefill_tokens_per_second", "prompt_tokens", "prefill_tokens_per_second")):
        value = pooled_rate([getattr(g, count) for g in generations], [getattr(g, rate) for g in generations])
        if value is not None:
            out[name] = (value, len(generations))
    return out


def by_position(records: Sequence[dict]) -> dict[tuple[str, int], str]:
    """(set, position in the set) -> greedy reply, over one model's generation records."""
    position: dict[str, int] = {}
    out = {}
    for r in records:
        if r.get("decoding", "greedy") != "greedy":
            continue
        index = position.get(r["set"], 0)
        position[r["set"]] = index + 1
        out[(r["set"], index)] = r["reply"]
    return out


def paired_replies(ours: Sequence[dict], theirs: Sequence[dict]) -> tuple[list[str], list[str]]:
    """The replies two backends gave to the same prompts (same set, same position), in our order;
    a prompt one of them did not answer is left out of both."""
    mine, other = by_position(ours), by_position(theirs)
    shared = [k for k in mine if k in other]
    return [mine[k] for k in shared], [other[k] for k in shared]


@dataclass
class FormOutcome:
    """One form of one model through Ollama: the served metrics' outcomes, the agreement of its
    replies with llama.cpp's, its speed and its replies."""

    values: dict[str, np.ndarray]                   # served metric -> one bool per prompt
    agreement: Agreement
    speed: dict[str, tuple[float, int]]
    records: list[dict] = field(default_factory=list)

    def rows(self, confidence: float) -> list[dict[str, Any]]:
        """Its ``served_figures`` rows: each served metric with its Wilson interval, each agreement
        figure (n: the replies paired), each speed figure (n: the replies timed)."""
        out = []
        for metric, values in self.values.items():
            i = wilson_interval(int(np.sum(values)), len(values), confidence)
            out.append({"metric": metric, "value": i.value, "ci_low": i.low, "ci_high": i.high, "n": i.n})
        agreement = self.agreement.as_dict()
        out += [{"metric": agreement_metric(name), "value": float(agreement[name]), "ci_low": None, "ci_high": None,
                 "n": self.agreement.replies} for name in AGREEMENT_FIELDS]
        out += [{"metric": name, "value": value, "ci_low": None, "ci_high": None, "n": n}
                for name, (value, n) in self.speed.items()]
        return out


@contextlib.contextmanager
def private_server() -> Iterator[Any]:
    """The cached Ollama build serving from a scratch store, stopped (with its runners) at exit."""
    from export.ollama_build import installed_binary
    from export.ollama_server import start_server, stop_server

    with tempfile.TemporaryDirectory(prefix="grit-eval-ollama-") as scratch:
        server = start_server(installed_binary(), Path(scratch) / "models", Path(scratch) / "server.log")
        try:
            yield server
        finally:
            stop_server(server.pid)


def measure_form(server, key: str, form: str, modelfile: Path, subject_of, llama_cpp_records: Sequence[dict],
                 metrics) -> FormOutcome:
    """Register one form from its Modelfile (the real CLI), check its greedy options, and measure
    the served ``metrics`` on its replies; ``subject_of(name, served)`` builds the
    ``evaluation.measure.Subject`` holding the held-out sets; ``llama_cpp_records``: the same
    model's generation records through llama.cpp, which its replies are paired with."""
    from evaluation.measure import measure
    from export.ollama import OllamaModel
    from export.ollama_server import check_greedy, create

    name = ollama_name(key, form)
    create(server, name, modelfile)
    check_greedy(server, name, modelfile)   # the options llama.cpp decodes with, exactly
    served = Recording(OllamaModel(server.url, name))
    subject = subject_of(key, served)
    values = measure(subject, metrics).values
    records = [{**r, "backend": BACKEND, "form": form} for r in subject.records]
    return FormOutcome(values, reply_agreement(*paired_replies(subject.records, llama_cpp_records)),
                       pooled_speed(served.generations), records)


def through_ollama(manifest: ServeManifest, keys: Sequence[str], forms: Sequence[str], subject_of,
                   llama_cpp_records: Sequence[dict], metrics) -> dict[str, dict[str, FormOutcome]]:
    """Model key -> form -> :class:`FormOutcome`, every served model on one private server."""
    out: dict[str, dict[str, FormOutcome]] = {}
    with private_server() as server:
        for key in keys:
            for form, modelfile in modelfiles(manifest, key, forms).items():
                print(f"[evaluate] {key} ({form}) through Ollama: greedy replies", flush=True)
                theirs = [r for r in llama_cpp_records if r["model"] == key]
                out.setdefault(key, {})[form] = measure_form(server, key, form, modelfile, subject_of, theirs,
                                                             metrics)
    return out
