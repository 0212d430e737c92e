"""The study's ledger: what a study has done, in small committed files, so that one study can be
produced over several sittings on machines that share no results store.

    reports/study/ledger/study.json     the study's key and its declared params when it began
    reports/study/ledger/trials.jsonl   every finished trial, one a line, as the study recorded it
    reports/study/ledger/journal.jsonl  Optuna's journal of every tuning, one log entry a line

A sitting begins by putting into its store what the ledger holds and the store lacks (trials and
journals), so the study resumes where the last sitting stopped, on any machine; each trial that
finishes is written to the store and to the ledger. The store stays the record of each run; the
ledger carries one study from store to store.

The key names the study's Optuna tunings. It is the hash of the params the study stage declares
(``dvc.yaml``) when the ledger began, and it holds while those params keep their values: a field
added later (at its default) does not end a study, a changed value does, and the ledger then
begins again (git keeps the old one).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.files import atomic_write_text

LEDGER_DIR = Path("reports/study/ledger")       # relative to the repository root
STUDY_FILE, TRIALS_FILE, JOURNAL_FILE = "study.json", "trials.jsonl", "journal.jsonl"


def key_of(declared: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(declared, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:12]


def data_fingerprint(files: dict[str, str]) -> str:
    """One short name for the prepared data a trial trained and was measured on, from the sha256
    of every data file (``artifacts/data/manifest.json``)."""
    return key_of(files)


def changed_values(old: Any, new: Any, path: str = "") -> list[str]:
    """The dotted names whose values differ between two params trees; a name present on one side
    only (a field added or retired since) is not a change."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [name for k in sorted(old.keys() & new.keys())
                for name in changed_values(old[k], new[k], f"{path}.{k}" if path else str(k))]
    return [] if old == new else [path or "(all)"]


def _jsonl(lines: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(line, sort_keys=True) + "\n" for line in lines)


def jsonl_records(text: str | None) -> list[dict[str, Any]]:
    """The records of a ledger file's text (``_jsonl``'s inverse; none when there is no file)."""
    return [json.loads(line) for line in (text or "").splitlines() if line.strip()]


def _text(path: Path) -> str | None:
    return path.read_text() if path.is_file() else None


@dataclass
class Ledger:
    """A study's ledger in ``folder``; ``note`` says what opening it found (for the log)."""

    folder: Path
    key: str
    declared: dict[str, Any]
    trials: list[dict[str, Any]] = field(default_factory=list)
    journals: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    note: str = ""
    data: str | None = None          # the fingerprint of the data the study began on

    def add_trial(self, record: dict[str, Any]) -> None:
        self.trials.append(record)
        atomic_write_text(self.folder / TRIALS_FILE, _jsonl(self.trials))

    def set_journals(self, journals: dict[str, list[dict[str, Any]]]) -> None:
        if journals == self.journals:
            return
        self.journals = dict(journals)
        atomic_write_text(self.folder / JOURNAL_FILE, _jsonl(
            [{"tuning": name, "log": log} for name in sorted(journals) for log in journals[name]]))


def open_ledger(folder: Path, declared: dict[str, Any], data: str | None = None) -> Ledger:
    """The ledger in ``folder`` when it belongs to a study with these ``declared`` params, else a
    new, empty one (written at once, so the folder always names the study it holds) that records
    ``data``, the fingerprint of the data it begins on."""
    header = folder / STUDY_FILE
    if header.is_file():
        old = json.loads(header.read_text())
        changed = changed_values(old["declared"], declared)
        if not changed:
            trials = jsonl_records(_text(folder / TRIALS_FILE))
            journals: dict[str, list[dict[str, Any]]] = {}
            for entry in jsonl_records(_text(folder / JOURNAL_FILE)):
                journals.setdefault(entry["tuning"], []).append(entry["log"])
            return Ledger(folder, old["key"], old["declared"], trials, journals,
                          note=f"the ledger holds {len(trials)} trials of study {old['key']}", data=old.get("data"))
        note = (f"the ledger's study {old['key']} had other values of {', '.join(changed[:5])}"
                f"{' ...' if len(changed) > 5 else ''}: a new study begins (git keeps the old ledger)")
    else:
        note = "no ledger yet: a new study begins"
    ledger = Ledger(folder, key_of(declared), declared, note=note, data=data)
    atomic_write_text(header, json.dumps({"key": ledger.key, "declared": declared, "data": data}, indent=1,
                                         sort_keys=True) + "\n")
    for name in (TRIALS_FILE, JOURNAL_FILE):
        atomic_write_text(folder / name, "")
    return ledger
