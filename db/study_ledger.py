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
begins again (git keeps the old one). A variant's overrides count as one value (an override added
changes what the variant trains). When every changed value belongs to one method's variant
(``variants.<method>``), only that method begins again: its trials and tunings leave the ledger,
and its tunings get a new name (the method's revision), so that no store's journal of the old
variant is ever resumed; every other method keeps what it did.
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
    # An override mapping is one value: a key added to it changes what the variant trains.
    if isinstance(old, dict) and isinstance(new, dict) and not path.endswith("_overrides"):
        return [name for k in sorted(old.keys() & new.keys())
                for name in changed_values(old[k], new[k], f"{path}.{k}" if path else str(k))]
    return [] if old == new else [path or "(all)"]


def method_of(name: str) -> str | None:
    """The method a changed param belongs to alone (``variants.<method>...``), else None."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "variants" else None


def _jsonl(lines: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(line, sort_keys=True) + "\n" for line in lines)


def _journal_lines(journals: dict[str, list[dict[str, Any]]]) -> str:
    return _jsonl([{"tuning": name, "log": log} for name in sorted(journals) for log in journals[name]])


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
    revisions: dict[str, str] = field(default_factory=dict)   # method -> its variant's hash, once revised

    def tuning(self, method: str) -> str:
        """The prefix of ``method``'s tuning names: the study's key, and the method's revision
        when its variant changed after the study began."""
        revision = self.revisions.get(method)
        return f"{self.key}/{method}" + (f"~{revision}" if revision else "")

    def is_current(self, tuning: str) -> bool:
        """Whether the tuning named ``tuning`` is one of this study's as its methods now stand."""
        key, _, rest = tuning.partition("/")
        method = rest.split("/")[0].split("~")[0]
        return key == self.key and tuning.startswith(self.tuning(method) + "/")

    def current(self, journals: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
        """The journals of ``journals`` that are this study's as its methods now stand."""
        return {name: logs for name, logs in journals.items() if self.is_current(name)}

    def add_trial(self, record: dict[str, Any]) -> None:
        self.trials.append(record)
        atomic_write_text(self.folder / TRIALS_FILE, _jsonl(self.trials))

    def set_journals(self, journals: dict[str, list[dict[str, Any]]]) -> None:
        journals = self.current(journals)
        if journals == self.journals:
            return
        self.journals = journals
        atomic_write_text(self.folder / JOURNAL_FILE, _journal_lines(journals))


def open_ledger(folder: Path, declared: dict[str, Any], data: str | None = None) -> Ledger:
    """The ledger in ``folder`` when it belongs to a study with these ``declared`` params (or with
    other values for some methods' variants only: those methods begin again), else a new, empty
    one (written at once, so the folder always names the study it holds) that records ``data``,
    the fingerprint of the data it begins on."""
    header = folder / STUDY_FILE
    if header.is_file():
        old = json.loads(header.read_text())
        journals: dict[str, list[dict[str, Any]]] = {}
        for entry in jsonl_records(_text(folder / JOURNAL_FILE)):
            journals.setdefault(entry["tuning"], []).append(entry["log"])
        ledger = Ledger(folder, old["key"], old["declared"], jsonl_records(_text(folder / TRIALS_FILE)), journals,
                        data=old.get("data"), revisions=old.get("revisions", {}))
        changed = changed_values(old["declared"], declared)
        if not changed:
            ledger.note = f"the ledger holds {len(ledger.trials)} trials of study {ledger.key}"
            return ledger
        methods = {method_of(name) for name in changed}
        if None not in methods:
            return revise(ledger, sorted(methods), declared, changed)
        note = (f"the ledger's study {old['key']} had other values of {', '.join(changed[:5])}"
                f"{' ...' if len(changed) > 5 else ''}: a new study begins (git keeps the old ledger)")
    else:
        note = "no ledger yet: a new study begins"
    ledger = Ledger(folder, key_of(declared), declared, note=note, data=data)
    _write(ledger)
    return ledger


def revise(ledger: Ledger, methods: list[str], declared: dict[str, Any], changed: list[str]) -> Ledger:
    """``ledger`` with ``methods`` begun again under their variants in ``declared``: their trials
    and tunings dropped (git keeps them), a new revision naming their tunings, every other
    method's work kept."""
    variants = {**ledger.declared["variants"], **{m: declared["variants"][m] for m in methods}}
    ledger.declared = {**ledger.declared, "variants": variants}
    ledger.revisions = {**ledger.revisions, **{m: key_of(variants[m])[:8] for m in methods}}
    dropped = [t for t in ledger.trials if t["method"] in methods]
    ledger.trials = [t for t in ledger.trials if t["method"] not in methods]
    ledger.journals = ledger.current(ledger.journals)
    ledger.note = (f"{', '.join(changed[:3])}{' ...' if len(changed) > 3 else ''} changed since study {ledger.key} "
                   f"began: {', '.join(methods)} begin again ({len(dropped)} trials dropped; git keeps them), the "
                   f"other methods' {len(ledger.trials)} trials are kept")
    _write(ledger)
    return ledger


def _write(ledger: Ledger) -> None:
    """The whole ledger to its folder, the header last (an interrupted write is redone on the next
    opening, which finds the old header)."""
    atomic_write_text(ledger.folder / TRIALS_FILE, _jsonl(ledger.trials))
    atomic_write_text(ledger.folder / JOURNAL_FILE, _journal_lines(ledger.journals))
    header = {"key": ledger.key, "declared": ledger.declared, "data": ledger.data}
    if ledger.revisions:
        header["revisions"] = ledger.revisions
    atomic_write_text(ledger.folder / STUDY_FILE, json.dumps(header, indent=1, sort_keys=True) + "\n")
