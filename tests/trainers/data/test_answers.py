"""Benign answers come from the base model, greedily, and are generated once per machine."""

from __future__ import annotations

import json
from pathlib import Path

from trainers.base_model import load_tokenizer, resolve_base_model
from trainers.config import ModelParams
from trainers.data import answers


def test_answers_are_greedy_cached_and_reused(tmp_path: Path, monkeypatch):
    params = ModelParams(source="tiny")
    files = resolve_base_model(params)
    monkeypatch.setenv("GRIT_CACHE_DIR", str(tmp_path))
    prompts = ["What is a cat?", "Name a fruit.", "What is a cat?"]
    first = answers.base_model_answers(prompts, files, params, max_new_tokens=6)
    assert len(first) == 3 and first[0] == first[2]
    (cache_file,) = (tmp_path / "answers").glob("*.jsonl")
    assert len(cache_file.read_text().splitlines()) == 2  # the duplicate prompt is generated once

    class Forbidden:  # a second call must not generate anything
        def __init__(self, *args, **kwargs):
            raise AssertionError("cached answers were regenerated")

    monkeypatch.setattr(answers, "_TransformersGenerator", Forbidden)
    assert answers.base_model_answers(prompts, files, params, max_new_tokens=6) == first


def test_an_answer_still_running_at_the_token_limit_is_given_up(tmp_path: Path, monkeypatch):
    """The tiny random model never ends a turn by itself: every answer runs into the limit and
    comes back None (dropped), never as a cut answer; the cache records it as incomplete."""
    params = ModelParams(source="tiny")
    files = resolve_base_model(params)
    monkeypatch.setenv("GRIT_CACHE_DIR", str(tmp_path))
    got = answers.base_model_answers(["What is a cat?", "Name a fruit."], files, params, max_new_tokens=7)
    assert got == [None, None]
    (cache_file,) = (tmp_path / "answers").glob("*.jsonl")
    assert cache_file.name.endswith("-7.jsonl")
    assert [json.loads(line)["complete"] for line in cache_file.read_text().splitlines()] == [False, False]


def test_a_complete_answer_cached_at_a_smaller_limit_is_reused_and_a_cut_one_is_not(tmp_path: Path, monkeypatch):
    """Greedy decoding: an answer that ended by itself within 4 tokens is the answer at 7 too, so
    it is not generated again; one cut at 4 says nothing about 7 and is generated."""
    params = ModelParams(source="tiny")
    files = resolve_base_model(params)
    monkeypatch.setenv("GRIT_CACHE_DIR", str(tmp_path))
    smaller = answers.AnswerCache(answers._cache_path(files, 4))
    smaller.put("What is a cat?", answers.Answer("A small animal.", True))
    smaller.put("Name a fruit.", answers.Answer("An apple is a", False))
    generated = []

    class Recording(answers._TransformersGenerator):
        def __call__(self, prompt: str) -> answers.Answer:
            generated.append(prompt)
            return super().__call__(prompt)

    monkeypatch.setattr(answers, "_TransformersGenerator", Recording)
    got = answers.base_model_answers(["What is a cat?", "Name a fruit."], files, params, max_new_tokens=7)
    assert generated == ["Name a fruit."]
    assert got == ["A small animal.", None]


def test_cache_rows_without_the_record_are_judged_by_their_length():
    tokenizer = load_tokenizer(resolve_base_model(ModelParams(source="tiny")), ModelParams(source="tiny"))
    short = answers.Answer("a cat", None)
    long = answers.Answer(" ".join(["cat"] * 40), None)
    assert answers.finished(short, tokenizer, 16) is True
    assert answers.finished(long, tokenizer, 16) is False
    assert answers.finished(answers.Answer(" ".join(["cat"] * 40), True), tokenizer, 16) is True
