"""The study's kept base-model answers (``pipelines/answer_cache.py``): what ``keep`` writes from a
cache, ``restore`` puts into another so that the cache's own reader returns the same answers; the
kept answers win over different cached ones; a bad kept file stops before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from core.errors import UserError
from pipelines.answer_cache import keep, main, read_answers, restore
from pipelines.profile import compose_params
from trainers.data.answers import Answer, AnswerCache

NAME = "0123456789abcdef-256.jsonl"
REPO_ROOT = Path(__file__).resolve().parents[2]


def cache_with(cache: Path, answers: dict[str, Answer]) -> AnswerCache:
    """A cache file written by the cache's own writer."""
    written = AnswerCache(cache / "answers" / NAME)
    for prompt, answer in answers.items():
        written.put(prompt, answer)
    return written


def test_kept_answers_restored_into_an_empty_cache_read_back_as_the_same_answers(tmp_path: Path):
    answers = {"hello": Answer("Hi there.", True), "tell me a long story": Answer("Once upon", False)}
    cache_with(tmp_path / "host-a", answers)
    assert keep(tmp_path / "kept", tmp_path / "host-a", NAME) == 2

    assert restore(tmp_path / "kept", tmp_path / "host-b") == {NAME: (2, 0)}
    read = AnswerCache(tmp_path / "host-b" / "answers" / NAME)
    assert {prompt: read.get(prompt) for prompt in answers} == answers
    # a second restore has nothing to add
    assert restore(tmp_path / "kept", tmp_path / "host-b") == {NAME: (0, 0)}
    assert len((tmp_path / "host-b" / "answers" / NAME).read_text().splitlines()) == 2


def test_the_kept_answer_replaces_a_different_cached_one_and_the_rest_is_kept(tmp_path: Path):
    cache_with(tmp_path / "study", {"hello": Answer("Hi there.", True)})
    keep(tmp_path / "kept", tmp_path / "study", NAME)
    # another CPU's greedy answer to the same prompt, and an answer the study never needed
    cache_with(tmp_path / "host", {"hello": Answer("Hello!", True), "other": Answer("Yes.", True)})

    assert restore(tmp_path / "kept", tmp_path / "host") == {NAME: (1, 1)}
    read = AnswerCache(tmp_path / "host" / "answers" / NAME)
    assert read.get("hello") == Answer("Hi there.", True) and read.get("other") == Answer("Yes.", True)


def test_a_bad_kept_file_is_one_error_line_and_no_cache_file_is_written(tmp_path: Path, capsys, monkeypatch):
    cache_with(tmp_path / "study", {"hello": Answer("Hi there.", True)})
    keep(tmp_path / "kept", tmp_path / "study", NAME)
    (tmp_path / "kept" / "fedcba9876543210-256.jsonl").write_text('{"prompt_sha256": "x", "answer": "a"}\n')
    with pytest.raises(UserError, match=r"fedcba9876543210-256.jsonl:1 is not an answer row"):
        restore(tmp_path / "kept", tmp_path / "host")
    assert not (tmp_path / "host").exists()

    monkeypatch.setenv("GRIT_CACHE_DIR", str(tmp_path / "host"))
    assert main(["restore", str(tmp_path / "kept")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and not (tmp_path / "host").exists()


def test_a_folder_without_answer_files_is_refused(tmp_path: Path):
    (tmp_path / "kept").mkdir()
    with pytest.raises(UserError, match="holds no answer file"):
        restore(tmp_path / "kept", tmp_path / "host")
    with pytest.raises(UserError, match="not a folder"):
        restore(tmp_path / "absent", tmp_path / "host")


def test_the_studys_kept_answers_are_at_the_study_profiles_token_limit_one_per_benign_prompt(tmp_path: Path):
    compose_params("study", tmp_path / "study-params.yaml")
    data = yaml.safe_load((tmp_path / "study-params.yaml").read_text())["data"]
    kept = sorted((REPO_ROOT / "reports/study/answers").glob("*.jsonl"))
    assert [p.name.rsplit("-", 1)[1] for p in kept] == [f"{data['answer_max_new_tokens']}.jsonl"]
    rows = read_answers(kept[0])
    lines = kept[0].read_text().splitlines()
    assert len(rows) == len(lines) == data["max_benign"]
    assert [json.loads(line)["prompt_sha256"] for line in lines] == sorted(rows)   # keep's stable order


def test_the_kept_file_name_is_the_name_the_answer_cache_itself_reads(tmp_path: Path):
    # answer_cache names files the way trainers/data/answers.py does without importing its private
    # helper: this pins the two namings together, so a rename on either side fails here, not as a
    # sitting that silently generates its answers again.
    from pipelines.answer_cache import _answer_file_name
    from pipelines.params import load_params
    from trainers.base_model import resolve_base_model
    from trainers.data.answers import _cache_path

    compose_params("study", tmp_path / "study-params.yaml")
    params = load_params(tmp_path / "study-params.yaml")
    name = _answer_file_name(tmp_path / "study-params.yaml")
    assert name == _cache_path(resolve_base_model(params.model), params.data.answer_max_new_tokens).name
    assert [p.name for p in (REPO_ROOT / "reports/study/answers").glob("*.jsonl")] == [name]
