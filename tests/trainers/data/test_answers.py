"""Benign answers come from the base model, greedily, and are generated once per machine."""

from __future__ import annotations

from pathlib import Path

from trainers.base_model import resolve_base_model
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
