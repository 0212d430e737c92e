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

An answer still running at the token limit is given up (None): training appends an end-of-turn
token to every answer, and on a cut answer that teaches the model to stop in mid-sentence. Cache
rows record whether the answer ended by itself (``complete``); rows written before that field
existed are judged by their length, cut when they re-tokenize to at least ``max_new_tokens - 1``
tokens (decoding and re-tokenizing can differ by one token at the edges).

Greedy decoding makes a limit only a place to stop: an answer that ended by itself within n
tokens is the same answer at every limit above n. So each prompt is generated once, at the one
limit, and a complete answer cached at a smaller limit is reused rather than generated again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Answer:
    text: str
    complete: bool | None    # ended with end of turn (True) or at the token limit; None: not recorded


class AnswerCache:
    """Append-only JSONL map from prompt hash to answer, one file per model and length."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.answers: dict[str, Answer] = {}
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    row = json.loads(line)
                    self.answers[row["prompt_sha256"]] = Answer(row["answer"], row.get("complete"))

    def get(self, prompt: str) -> Answer | None:
        return self.answers.get(_prompt_key(prompt))

    def put(self, prompt: str, answer: Answer) -> None:
        key = _prompt_key(prompt)
        self.answers[key] = answer
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"prompt_sha256": key, "answer": answer.text, "complete": answer.complete}) + "\n")


def _prompt_ids(tokenizer, prompt: str) -> list[int]:
    rendered = tokenizer.apply_chat_template(
        chat_messages(prompt), tokenize=True, add_generation_prompt=True, return_dict=True
    )
    return list(rendered["input_ids"])


class _LlamaCppGenerator:
    def __init__(self, files: BaseModelFiles, tokenizer, max_new_tokens: int) -> None:
        from llama_cpp import Llama

        from core.threads import llama_threads

        threads = llama_threads()      # core/threads.py: decode on half the usable CPUs, prompts on all
        self.llm = Llama(model_path=str(files.gguf_path), n_ctx=2048, seed=0, verbose=False,
                         n_threads=threads.decode, n_threads_batch=threads.batch)
        self.tokenizer, self.max_new_tokens = tokenizer, max_new_tokens
        self.stop_id = end_of_turn_id(tokenizer)

    def __call__(self, prompt: str) -> Answer:
        # Token ids from the HF template, so llama.cpp sees exactly what training sees.
        ids = _prompt_ids(self.tokenizer, prompt)
        self.llm.reset()
        out: list[int] = []
        complete = False
        for token in self.llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            if token == self.stop_id or token == self.llm.token_eos():
                complete = True
                break
            if len(out) >= self.max_new_tokens:
                break
            out.append(token)
        return Answer(self.tokenizer.decode(out, skip_special_tokens=True).strip(), complete)


class _TransformersGenerator:
    def __init__(self, files: BaseModelFiles, model_params: ModelParams, tokenizer, max_new_tokens: int) -> None:
        import torch

        self.torch = torch
        self.model = load_causal_lm(files, model_params).eval()
        self.tokenizer, self.max_new_tokens = tokenizer, max_new_tokens

    def __call__(self, prompt: str) -> Answer:
        ids = self.torch.tensor([_prompt_ids(self.tokenizer, prompt)], device=self.model.device)
        stop = end_of_turn_id(self.tokenizer)
        with self.torch.no_grad():
            output = self.model.generate(
                input_ids=ids, attention_mask=self.torch.ones_like(ids), do_sample=False,
                max_new_tokens=self.max_new_tokens, eos_token_id=stop,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        new = output[0, ids.shape[1]:].tolist()
        complete = stop in new or len(new) < self.max_new_tokens
        return Answer(self.tokenizer.decode(new, skip_special_tokens=True).strip(), complete)


def _cache_path(files: BaseModelFiles, max_new_tokens: int) -> Path:
    return cache_dir() / "answers" / f"{model_key(files)}-{max_new_tokens}.jsonl"


def _cached_limits(files: BaseModelFiles) -> dict[int, Path]:
    """Token limit -> the cache file of this model's answers at that limit."""
    paths = (cache_dir() / "answers").glob(f"{model_key(files)}-*.jsonl")
    return {int(p.stem.rsplit("-", 1)[1]): p for p in paths if p.stem.rsplit("-", 1)[1].isdigit()}


def _complete_at_smaller_limits(files: BaseModelFiles, max_new_tokens: int, tokenizer) -> dict[str, Answer]:
    """Prompt hash -> answer that ended by itself under a smaller limit, hence the same at
    ``max_new_tokens`` (module docstring)."""
    complete: dict[str, Answer] = {}
    for limit, path in sorted(_cached_limits(files).items()):
        if limit < max_new_tokens:
            complete |= {key: Answer(answer.text, True) for key, answer in AnswerCache(path).answers.items()
                         if finished(answer, tokenizer, limit)}
    return complete


def _answers(prompts: Sequence[str], files: BaseModelFiles, model_params: ModelParams, tokenizer,
             max_new_tokens: int) -> list[Answer]:
    """Greedy answers at one token limit, generating only those no cache holds."""
    cache = AnswerCache(_cache_path(files, max_new_tokens))
    shorter = _complete_at_smaller_limits(files, max_new_tokens, tokenizer)
    for prompt in dict.fromkeys(prompts):
        if cache.get(prompt) is None and (reused := shorter.get(_prompt_key(prompt))) is not None:
            cache.put(prompt, reused)
    missing = [p for p in dict.fromkeys(prompts) if cache.get(p) is None]
    if missing:
        generate = (
            _LlamaCppGenerator(files, tokenizer, max_new_tokens) if files.gguf_path is not None
            else _TransformersGenerator(files, model_params, tokenizer, max_new_tokens)
        )
        for prompt in tqdm(missing, desc=f"base-model answers (up to {max_new_tokens} tokens)", unit="prompt"):
            cache.put(prompt, generate(prompt))
    return [cache.get(p) or Answer("", True) for p in prompts]


def finished(answer: Answer, tokenizer, max_new_tokens: int) -> bool:
    """Did the model end this answer itself (module docstring: rows without the record)?"""
    if answer.complete is not None:
        return answer.complete
    return len(tokenizer(answer.text, add_special_tokens=False).input_ids) < max_new_tokens - 1


def base_model_answers(prompts: Sequence[str], files: BaseModelFiles, model_params: ModelParams,
                       max_new_tokens: int) -> list[str | None]:
    """Greedy answers of the base model to ``prompts``; None where the answer was still running
    after ``max_new_tokens`` tokens."""
    tokenizer = load_tokenizer(files, model_params)
    return [a.text if finished(a, tokenizer, max_new_tokens) else None
            for a in _answers(prompts, files, model_params, tokenizer, max_new_tokens)]
