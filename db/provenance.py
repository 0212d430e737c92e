"""What determines a study trial's result, as one fingerprint kept with the trial.

A trial's ``provenance`` names the project source files a trial needs (``files``: the static
import closure of the trial process's entry module, :func:`needed_files`, path-sorted), hashed by
content (``code``); the lock files the environment was installed from (``locks``); the prepared
data (``data``, ``db.study_ledger.data_fingerprint``); and the variant's params (``params``).
``setup`` joins code, locks and data: what two compared parts must share. ``fingerprint`` adds
the params: what makes one trial's result. The sitting start refuses a working tree that changes
a file earlier trials needed (:func:`dirty_loaded_files`), and the report refuses to compare
parts whose setups differ (:func:`check_one_setup`).

Why the closure and not what the process had imported (``sys.modules``, which trials before
study ``f6fd98fb4b02``'s end recorded as ``loaded``): a tuning process runs its trials one after
another, and a trial pruned before the process had measured one had not imported the measurement
modules, so the same code at the same revision recorded another setup. Every import counts,
those inside functions too (a trial may take any of them), so the set depends only on the tree.
"""

from __future__ import annotations

import ast
import hashlib
import json
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from core.errors import UserError
from db.study_ledger import LEDGER_DIR

# The environment's pins (scripts/check_lock.py's requirement files, and setup.sh's pip pin).
LOCK_FILES = ("requirements/lock.txt", "requirements/no-deps.txt", "requirements/test.txt", "scripts/setup.sh")


class ProvenanceError(UserError):
    """Trials of different code, environment or data are about to be treated as one."""


def _digest(parts: Iterable[bytes]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:12]


def module_file(module: str, root: Path) -> str | None:
    """The project file (relative POSIX path) that defines ``module`` under ``root``: its ``.py``,
    or its package's ``__init__.py``; None for a module from outside the project."""
    base = Path(root).joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate.relative_to(root).as_posix()
    return None


def imported_modules(source: str, module: str, is_package: bool) -> set[str]:
    """Every module name ``source`` (the text of ``module``) may import, anywhere in it: ``import
    a.b``, ``from a import b`` (both ``a`` and ``a.b``: b may be a submodule), relative imports
    resolved against ``module``'s package."""
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                anchor = ".".join(parts[:len(parts) - node.level + 1])
                origin = f"{anchor}.{node.module}" if node.module else anchor
            else:
                origin = node.module or ""
            found.add(origin)
            found.update(f"{origin}.{alias.name}" for alias in node.names if alias.name != "*")
    return found


def needed_files(entries: Iterable[str], root: Path) -> list[str]:
    """The project files the modules ``entries`` need: the closure of their imports under ``root``
    (:func:`imported_modules`, each parent package's ``__init__.py`` included, as Python loads
    it), relative POSIX paths, sorted."""
    files: dict[str, str] = {}
    pending = list(entries)
    while pending:
        parts = pending.pop().split(".")
        for depth in range(1, len(parts) + 1):
            module = ".".join(parts[:depth])
            if module in files or (path := module_file(module, root)) is None:
                continue
            files[module] = path
            pending.extend(imported_modules((Path(root) / path).read_text(), module, path.endswith("__init__.py")))
    return sorted(set(files.values()))


def code_fingerprint(files: Iterable[str], root: Path) -> str:
    """One short hash of ``files`` (paths relative to ``root``), path-sorted: each path with its
    content, so a changed, added, removed or renamed file changes it. A missing file counts as
    absent (its path alone)."""
    def entry(name: str) -> bytes:
        path = Path(root) / name
        content = path.read_bytes() if path.is_file() else b"<absent>"
        return name.encode() + b"\0" + hashlib.sha256(content).digest()

    return _digest(entry(name) for name in sorted(set(files)))


def params_fingerprint(params: Mapping[str, Any]) -> str:
    return _digest([json.dumps(params, sort_keys=True, separators=(",", ":")).encode()])


def trial_provenance(files: list[str], root: Path, data: str | None, params: Mapping[str, Any]) -> dict[str, Any]:
    """The provenance a trial record carries (module docstring)."""
    code, locks = code_fingerprint(files, root), code_fingerprint(LOCK_FILES, root)
    setup = _digest([code.encode(), locks.encode(), str(data).encode()])
    own = params_fingerprint(params)
    return {"fingerprint": _digest([setup.encode(), own.encode()]), "setup": setup, "code": code,
            "locks": locks, "data": data, "params": own, "files": list(files)}


def recorded_files(provenance: Mapping[str, Any] | None) -> list[str]:
    """The project files a trial's provenance names: ``files`` (what it needed), or ``loaded``
    in records from before (what its process had imported)."""
    provenance = provenance or {}
    return list(provenance.get("files", provenance.get("loaded", [])))


def changed_paths(porcelain: str) -> list[str]:
    """The paths ``git status --porcelain -z --untracked-files=all`` names: modified, added,
    deleted, untracked, and both sides of a rename or copy."""
    fields = porcelain.split("\0")
    paths, i = [], 0
    while i < len(fields):
        entry = fields[i]
        i += 1
        if len(entry) < 4:
            continue
        paths.append(entry[3:])
        if entry[0] in "RC":             # the original path follows as its own field
            paths.append(fields[i])
            i += 1
    return paths


def working_tree_changes(root: Path) -> list[str] | None:
    """The paths the working tree at ``root`` changes against its commit, untracked included;
    None where ``root`` is no git checkout (or git is missing)."""
    try:
        done = subprocess.run(["git", "status", "--porcelain", "-z", "--untracked-files=all"], cwd=root,
                              capture_output=True, text=True, check=False)
    except OSError:
        return None
    return changed_paths(done.stdout) if done.returncode == 0 else None


def dirty_loaded_files(loaded: Iterable[str], git_changes: Iterable[str]) -> list[str]:
    """The working-tree changes that touch ``loaded`` (files earlier trials needed), sorted; the
    study's own ledger, which every sitting rewrites, is never one."""
    ledger = PurePosixPath(LEDGER_DIR.as_posix())
    changed = {c for c in git_changes if not PurePosixPath(c).is_relative_to(ledger)}
    return sorted(changed & set(loaded))


def check_one_setup(parts: Mapping[str, Iterable[str | None]]) -> str | None:
    """The one setup fingerprint the trials of ``parts`` (a part's name -> its trials' setups)
    share; raises :class:`ProvenanceError` naming two parts and both fingerprints when they
    differ. A trial that recorded none (older ledgers) is left out of the comparison."""
    first: tuple[str, str] | None = None
    for part, setups in parts.items():
        for setup in setups:
            if setup is None:
                continue
            if first is None:
                first = (part, setup)
            elif setup != first[1]:
                raise ProvenanceError(
                    f"{first[0]} was trained with setup {first[1]} and {part} with setup {setup} (code, locks or "
                    "data differ): the report compares only trials of one setup; train the parts again on one "
                    "checkout, or begin a new study")
    return None if first is None else first[1]


def check_sitting_may_start(trials: Iterable[Mapping[str, Any]], git_changes: Iterable[str] | None, study: str) -> None:
    """Refuse a sitting whose working tree changes a file that earlier trials of the ledger
    needed: its trials would record code no commit holds, beside trials of other code."""
    loaded = {name for trial in trials for name in recorded_files(trial.get("provenance"))}
    dirty = dirty_loaded_files(loaded, git_changes or [])
    if dirty:
        shown = ", ".join(dirty[:3]) + (f" and {len(dirty) - 3} more" if len(dirty) > 3 else "")
        raise ProvenanceError(
            f"the working tree changes {len(dirty)} file{'s' if len(dirty) > 1 else ''} that earlier trials of study "
            f"{study} needed ({shown}): revert them before a sitting, or commit them knowing that later trials then "
            "record another setup, which the report will not compare with the earlier ones")
