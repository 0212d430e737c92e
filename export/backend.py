"""The embedded serving backend: llama.cpp (the engine Ollama runs) through llama-cpp-python.

It loads exactly the files a Modelfile names (``FROM`` base GGUF, optional ``ADAPTER`` GGUF, or a
merged GGUF), renders prompts with the same chat format as the Modelfile's ``TEMPLATE`` and stops
at the same end-of-turn tokens. Decoding is greedy (``export.decoding``, which the Modelfiles
state too); speed comes from llama.cpp's own timers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from export.chat_format import ChatFormat
from export.decoding import llama_cpp_sampling


@dataclass(frozen=True)
class Generation:
    text: str
    stopped_at_end_of_turn: bool      # False: ran into max_new_tokens (run-on text)
    prompt_tokens: int
    new_tokens: int
    prefill_tokens_per_second: float | None
    decode_tokens_per_second: float | None


def serving_device() -> str:
    """"gpu" where the installed llama.cpp runtime can offload (the ``GRIT_LLAMA_BUILD=cuda``
    build, ``export.llama_cpp``) and then every layer goes to the GPU, else "cpu" (the portable
    and native builds: nothing changes)."""
    from llama_cpp import llama_supports_gpu_offload

    return "gpu" if llama_supports_gpu_offload() else "cpu"


class LlamaCppModel:
    def __init__(self, model_path: Path, chat: ChatFormat, adapter_path: Path | None = None, n_ctx: int = 2048,
                 n_threads: int | None = None, prompt_cache: bool = True) -> None:
        """``prompt_cache``: keep the key/value cache of the prefix a prompt shares with the last
        one (``_evaluate_from_cache``); False evaluates every prompt whole, for timing prefill."""
        from llama_cpp import Llama

        from core.threads import LlamaThreads, llama_threads

        # core/threads.py: decoding on half the usable CPUs, prompts on all of them
        threads = llama_threads() if n_threads is None else LlamaThreads(n_threads, n_threads)
        self.chat, self.prompt_cache = chat, prompt_cache
        self.device = serving_device()
        self.llm = Llama(model_path=str(model_path), lora_path=str(adapter_path) if adapter_path else None,
                         n_ctx=n_ctx, logits_all=False, seed=0, verbose=False, n_threads=threads.decode,
                         n_threads_batch=threads.batch, n_gpu_layers=-1 if self.device == "gpu" else 0)
        self.stop_ids = {self._single_token(stop) for stop in chat.stops} | {self.llm.token_eos()}

    def _single_token(self, text: str) -> int:
        ids = self.llm.tokenize(text.encode(), add_bos=False, special=True)
        if len(ids) != 1:
            raise ValueError(f"end-of-turn marker {text!r} is not one token in this model's vocabulary")
        return ids[0]

    def prompt_tokens(self, prompt: str, system: str | None = None) -> list[int]:
        """The prompt as the Modelfile's TEMPLATE renders it, tokenized by llama.cpp."""
        rendered = self.chat.render(prompt, system)
        has_bos = bool(self.chat.bos) and rendered.startswith(self.chat.bos)
        return self.llm.tokenize(rendered.encode(), add_bos=not has_bos, special=True)

    def _evaluate_from_cache(self, tokens: list[int]) -> None:
        """Evaluate ``tokens``, keeping the key/value cache of the longest prefix they share with
        what was evaluated last (the chat format's system block), as Ollama's server does with
        prompt caching. The last token is always evaluated: its logits are wanted."""
        shared = 0
        for cached, token in zip(self.llm.input_ids[:self.llm.n_tokens] if self.prompt_cache else [], tokens[:-1],
                                 strict=False):
            if cached != token:
                break
            shared += 1
        self.llm.n_tokens = shared      # eval() drops the cache from here on
        self.llm.eval(tokens[shared:])

    def next_token_logits(self, prompt: str) -> np.ndarray:
        self._evaluate_from_cache(self.prompt_tokens(prompt))
        # Only the last position's logits are computed (logits_all would copy a vocabulary-wide
        # row per decoded token, slowing generation by a third).
        row = np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.llm.n_vocab(),))
        return np.array(row, dtype=np.float64)

    def generate(self, prompt: str, max_new_tokens: int) -> Generation:
        import llama_cpp

        tokens = self.prompt_tokens(prompt)
        context = self.llm._ctx.ctx
        llama_cpp.llama_perf_context_reset(context)
        out: list[int] = []
        stopped = False
        self._evaluate_from_cache(tokens)
        # generate() sees the prompt already evaluated and samples from its logits at once.
        for token in self.llm.generate(tokens, reset=True, **llama_cpp_sampling()):
            if token in self.stop_ids:
                stopped = True
                break
            out.append(token)
            if len(out) >= max_new_tokens:
                break
        perf = llama_cpp.llama_perf_context(context)
        return Generation(
            text=self.llm.detokenize(out).decode("utf-8", errors="replace").strip(),
            stopped_at_end_of_turn=stopped, prompt_tokens=len(tokens), new_tokens=len(out),
            prefill_tokens_per_second=_rate(perf.n_p_eval, perf.t_p_eval_ms),
            decode_tokens_per_second=_rate(perf.n_eval, perf.t_eval_ms),
        )

    def close(self) -> None:
        self.llm.close()


def _rate(count: int, milliseconds: float) -> float | None:
    return count / milliseconds * 1000 if count > 0 and milliseconds > 0 else None
