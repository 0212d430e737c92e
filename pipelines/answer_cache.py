"""The study's base-model answers, kept in the repository and put into the cache before a sitting.

    python -m pipelines.answer_cache restore reports/study/answers
    python -m pipelines.answer_cache keep reports/study/answers --params outputs/study-params.yaml

Why: the benign training targets are the base model's greedy answers through llama.cpp
(``trainers/data/answers.py``), cached in ``$GRIT_CACHE_DIR/answers/``. A sitting on a fresh host
would generate them again, about 20 minutes on 2 cores before its first trial
(``benchmarks/results/sitting-start-2cpu.json``), and greedy answers can differ between CPUs, which
would give later trials other data than the study began on. So the answers the study trained on
are committed beside its ledger, and ``make sitting`` restores them before preparing its data:
every sitting, on any host, trains on the same answers and generates none.

``restore`` merges each kept file into the cache file of the same name (``<model key>-<token
limit>.jsonl``, the cache's own naming): an answer the cache lacks is added, one it holds
differently is replaced by the kept one (the study's data win; the count is printed), one it holds
the same is left. ``keep`` writes the cache's answers of the params' model and token limit into
the folder, for a new study to commit.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Mapping
from pathlib import Path

from core.errors import UserError, exit_status
from core.files import atomic_write_text, cache_dir

_KEY = re.compile(r"[0-9a-f]{64}")
_NAME = re.compile(r"[0-9a-f]{16}-[0-9]+\.jsonl")


def read_answers(path: Path) -> dict[str, dict]:
    """Prompt hash -> row of one answer file (the last row of a hash wins, as the cache reads it).
    A row without a prompt hash or an answer text is a :class:`UserError` naming its line."""
    rows: dict[str, dict] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{path}:{number} is not a JSON line ({error.msg})") from None
        if not isinstance(row, dict) or not _KEY.fullmatch(str(row.get("prompt_sha256", ""))) \
                or not isinstance(row.get("answer"), str):
            raise UserError(f"{path}:{number} is not an answer row (prompt_sha256 and answer)")
        rows[row["prompt_sha256"]] = row
    return rows


def _same(a: dict, b: dict) -> bool:
    return a["answer"] == b["answer"] and a.get("complete") == b.get("complete")


def rows_to_add(kept: Mapping[str, dict], cached: Mapping[str, dict]) -> tuple[list[dict], int]:
    """The kept rows the cache must append to read them (absent or different there), and how many
    of those replace a different cached answer."""
    added = [row for key, row in sorted(kept.items()) if key not in cached or not _same(row, cached[key])]
    return added, sum(row["prompt_sha256"] in cached for row in added)


def _answer_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder of kept answers")
    files = sorted(p for p in folder.glob("*.jsonl") if _NAME.fullmatch(p.name))
    if not files:
        raise UserError(f"{folder} holds no answer file named <model key>-<token limit>.jsonl")
    return files


def restore(folder: Path, cache: Path) -> dict[str, tuple[int, int]]:
    """Merge every kept answer file into the cache (module docstring); per file, the rows added and
    how many of them replaced a different answer. Every file is read before any is written."""
    kept = {path.name: read_answers(path) for path in _answer_files(folder)}
    done: dict[str, tuple[int, int]] = {}
    for name, rows in kept.items():
        target = cache / "answers" / name
        cached = read_answers(target) if target.is_file() else {}
        added, replaced = rows_to_add(rows, cached)
        if added:
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "a", encoding="utf-8") as handle:   # append-only, as the cache writes it
                handle.writelines(json.dumps(row) + "\n" for row in added)
        done[name] = (len(added), replaced)
    return done


def keep(folder: Path, cache: Path, name: str) -> int:
    """Write the cache's answer file ``name`` into the folder, one row per prompt in hash order
    (a stable file for git); the number of answers written."""
    source = cache / "answers" / name
    if not source.is_file():
        raise UserError(f"the cache holds no answers at {source}; prepare the data first")
    rows = read_answers(source)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / name, "".join(json.dumps(rows[key]) + "\n" for key in sorted(rows)))
    return len(rows)


def _answer_file_name(params_path: Path) -> str:
    """The cache file name of the params' base model at its token limit."""
    from pipelines.params import load_params
    from trainers.base_model import resolve_base_model
    from trainers.data.answers import model_key

    params = load_params(params_path)
    return f"{model_key(resolve_base_model(params.model))}-{params.data.answer_max_new_tokens}.jsonl"


def restore_into_cache(folder: Path) -> None:
    """``restore``: the kept answers into ``GRIT_CACHE_DIR``, one line per file."""
    for name, (added, replaced) in restore(folder, cache_dir()).items():
        print(f"[answers] {name}: {added} kept answers put into the cache"
              + (f", {replaced} of them in place of a different cached answer" if replaced else ""))


def keep_from_cache(folder: Path, params_path: Path) -> None:
    """``keep``: the cache's answers of the params' model and token limit into the folder."""
    name = _answer_file_name(params_path)
    print(f"[answers] {keep(folder, cache_dir(), name)} answers kept in {folder / name}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.answer_cache", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["restore", "keep"])
    parser.add_argument("folder", type=Path, help="the kept answers (the study's: reports/study/answers)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"),
                        help="keep: the params whose model and token limit name the answers (default: params.yaml)")
    args = parser.parse_args(argv)
    if args.action == "restore":
        return exit_status(lambda: restore_into_cache(args.folder))
    return exit_status(lambda: keep_from_cache(args.folder, args.params))


if __name__ == "__main__":
    raise SystemExit(main())
