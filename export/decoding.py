"""Greedy decoding, written once: what the evaluation samples with through llama.cpp and what
every Modelfile, create payload and Ollama request states, so that ``ollama run <name>``
answers what the evaluation measured.

Ollama's defaults are not greedy: temperature 0.8, top_k 40 and, above all, repeat_penalty 1.1
over the last 64 tokens, which its llama.cpp sampler applies before the temperature step even at
temperature 0 (issue 64: refusal rates through Ollama fell from 0.80 to 0.36 on pure_grit with
the default penalty). llama-cpp-python's greedy path applies no penalty.
"""

from __future__ import annotations

# Ollama's option names (api.Options); every penalty disabled, the top token only.
GREEDY: dict[str, float | int] = {
    "temperature": 0.0,
    "top_k": 1,
    "top_p": 1.0,
    "min_p": 0.0,
    "repeat_penalty": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
}

# llama-cpp-python's ``Llama.generate`` keywords for the same options.
_LLAMA_CPP_NAMES = {"temperature": "temp"}


def llama_cpp_sampling() -> dict[str, float | int]:
    """:data:`GREEDY` as keyword arguments of ``llama_cpp.Llama.generate``."""
    return {_LLAMA_CPP_NAMES.get(name, name): value for name, value in GREEDY.items()}


def ollama_options(seed: int, num_predict: int) -> dict[str, float | int]:
    """The ``options`` of an Ollama generate request that decodes as the evaluation does."""
    return {**GREEDY, "seed": seed, "num_predict": num_predict}
