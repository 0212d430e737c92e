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


def test_an_answer_cut_at_the_token_limit_is_retried_longer_then_given_up(tmp_path: Path, monkeypatch):
    """The tiny random model never ends a turn by itself: every answer is cut, so each prompt is
    generated at both limits and comes back None (dropped), never as a cut answer."""
    params = ModelParams(source="tiny")
    files = resolve_base_model(params)
    monkeypatch.setenv("GRIT_CACHE_DIR", str(tmp_path))
    got = answers.base_model_answers(["What is a cat?", "Name a fruit."], files, params, max_new_tokens=4,
                                     retry_max_new_tokens=7)
    assert got == [None, None]
    caches = sorted(p.name.rsplit("-", 1)[1] for p in (tmp_path / "answers").glob("*.jsonl"))
    assert caches == ["4.jsonl", "7.jsonl"]
    rows = [json.loads(line) for line in (tmp_path / "answers").glob("*-7.jsonl").__next__().read_text().splitlines()]
    assert [r["complete"] for r in rows] == [False, False]


def test_cache_rows_without_the_record_are_judged_by_their_length():
    tokenizer = load_tokenizer(resolve_base_model(ModelParams(source="tiny")), ModelParams(source="tiny"))
    short = answers.Answer("a cat", None)
    long = answers.Answer(" ".join(["cat"] * 40), None)
    assert answers.finished(short, tokenizer, 16) is True
    assert answers.finished(long, tokenizer, 16) is False
    assert answers.finished(answers.Answer(" ".join(["cat"] * 40), True), tokenizer, 16) is True
