"""Helpful answers for benign training prompts: the base model's own greedy answers, cached.

Why the base model's answers rather than the corpus's: the safety task should teach *refusing
harmful requests* and nothing else. Training benign prompts on the base model's own greedy
answers keeps its benign behaviour as it was (self-distillation), so every change we later
measure on benign and factual sets comes from the refusal training, not from overwriting the
model's style with chatterbot's terse (sometimes wrong) one-liners.

Generation runs through llama.cpp on the base GGUF when one exists (the embedded model: the
same engine that serves it), otherwise through transformers. Decoding is greedy. Answers are
cached per (model content key, max_new_tokens, prompt) in ``$GRIT_CACHE_DIR/answers/``, so
they are generated once per machine and reused by every later run.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from core.files import cache_dir
from trainers.base_model import BaseModelFiles, load_causal_lm, load_tokenizer
from trainers.config import ModelParams
from trainers.data.formatting import chat_messages, end_of_turn_id


def model_key(files: BaseModelFiles) -> str:
    identity = files.source_sha256 or f"{files.source}:{files.name}:{files.hf_dir.name}"
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


def _prompt_key(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()


class AnswerCache:
    """Append-only JSONL map from prompt hash to answer, one file per model and length."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.answers: dict[str, str] = {}
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    row = json.loads(line)
                    self.answers[row["prompt_sha256"]] = row["answer"]

    def get(self, prompt: str) -> str | None:
        return self.answers.get(_prompt_key(prompt))

    def put(self, prompt: str, answer: str) -> None:
        key = _prompt_key(prompt)
        self.answers[key] = answer
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"prompt_sha256": key, "answer": answer}) + "\n")


def _prompt_ids(tokenizer, prompt: str) -> list[int]:
    rendered = tokenizer.apply_chat_template(
        chat_messages(prompt), tokenize=True, add_generation_prompt=True, return_dict=True
    )
    return list(rendered["input_ids"])


class _LlamaCppGenerator:
    def __init__(self, files: BaseModelFiles, tokenizer, max_new_tokens: int) -> None:
        import os

        from llama_cpp import Llama

        # llama-cpp-python defaults to half the cores; generation here is the only work running.
        threads = os.cpu_count() or 1
        self.llm = Llama(model_path=str(files.gguf_path), n_ctx=2048, seed=0, verbose=False,
                         n_threads=threads, n_threads_batch=threads)
        self.tokenizer, self.max_new_tokens = tokenizer, max_new_tokens
        self.stop_id = end_of_turn_id(tokenizer)

    def __call__(self, prompt: str) -> str:
        # Token ids from the HF template, so llama.cpp sees exactly what training sees.
        ids = _prompt_ids(self.tokenizer, prompt)
        self.llm.reset()
        out: list[int] = []
        for token in self.llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            if token == self.stop_id or token == self.llm.token_eos() or len(out) >= self.max_new_tokens:
                break
            out.append(token)
        return self.tokenizer.decode(out, skip_special_tokens=True).strip()


class _TransformersGenerator:
    def __init__(self, files: BaseModelFiles, model_params: ModelParams, tokenizer, max_new_tokens: int) -> None:
        import torch

        self.torch = torch
        self.model = load_causal_lm(files, model_params).eval()
        self.tokenizer, self.max_new_tokens = tokenizer, max_new_tokens

    def __call__(self, prompt: str) -> str:
        ids = self.torch.tensor([_prompt_ids(self.tokenizer, prompt)], device=self.model.device)
        with self.torch.no_grad():
            output = self.model.generate(
                input_ids=ids, attention_mask=self.torch.ones_like(ids), do_sample=False,
                max_new_tokens=self.max_new_tokens, eos_token_id=end_of_turn_id(self.tokenizer),
                pad_token_id=self.tokenizer.pad_token_id,
            )
        return self.tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True).strip()


def base_model_answers(
    prompts: Sequence[str], files: BaseModelFiles, model_params: ModelParams, max_new_tokens: int,
) -> list[str]:
    """Greedy answers of the base model to ``prompts``, generating only the uncached ones."""
    cache = AnswerCache(cache_dir() / "answers" / f"{model_key(files)}-{max_new_tokens}.jsonl")
    missing = [p for p in dict.fromkeys(prompts) if cache.get(p) is None]
    if missing:
        tokenizer = load_tokenizer(files, model_params)
        generate = (
            _LlamaCppGenerator(files, tokenizer, max_new_tokens) if files.gguf_path is not None
            else _TransformersGenerator(files, model_params, tokenizer, max_new_tokens)
        )
        for prompt in tqdm(missing, desc="base-model answers", unit="prompt"):
            cache.put(prompt, generate(prompt))
    return [cache.get(p) or "" for p in prompts]
