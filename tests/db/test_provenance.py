"""A trial's provenance: the code it needs, the locks and the data, as one fingerprint; a sitting
refuses a working tree that changes what earlier trials needed (or, in older records, loaded),
and the report will not compare parts of different setups."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from db.provenance import (
    LOCK_FILES,
    ProvenanceError,
    changed_paths,
    check_one_setup,
    check_sitting_may_start,
    code_fingerprint,
    dirty_loaded_files,
    needed_files,
    trial_provenance,
    working_tree_changes,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def _project(root: Path) -> list[str]:
    (root / "trainers").mkdir()
    (root / "trainers" / "recipe.py").write_text("STEP = 'backward'\n")
    (root / "core.py").write_text("X = 1\n")
    return ["core.py", "trainers/recipe.py"]


def test_the_code_fingerprint_changes_with_a_loaded_files_content_only(tmp_path):
    files = _project(tmp_path)
    before = code_fingerprint(files, tmp_path)
    assert code_fingerprint(list(reversed(files)), tmp_path) == before            # path-sorted
    (tmp_path / "unloaded.py").write_text("anything\n")
    assert code_fingerprint(files, tmp_path) == before
    (tmp_path / "trainers" / "recipe.py").write_text("STEP = 'clip'\n")
    assert code_fingerprint(files, tmp_path) != before
    assert code_fingerprint(files[:1], tmp_path) != code_fingerprint(files, tmp_path)


def test_a_trial_needs_the_import_closure_of_its_entry_whatever_its_process_imported(tmp_path):
    """The files a trial needs are the closure of its entry module's imports, those inside
    functions and relative ones included, each parent package's __init__ with them; a module from
    outside the project and a file nothing imports are not among them."""
    files = {
        "job.py": "import json\nfrom trainers import recipe\n\ndef run():\n    from evaluation.measure import m\n",
        "trainers/__init__.py": "",
        "trainers/recipe.py": "from . import optim\nfrom .steps import *\n",
        "trainers/optim.py": "import torch\n",
        "trainers/steps.py": "",
        "evaluation/__init__.py": "from evaluation.stats import t\n",
        "evaluation/measure.py": "from .stats import t\n",
        "evaluation/stats.py": "",
        "unused.py": "import job\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert needed_files(["job"], tmp_path) == sorted(set(files) - {"unused.py"})

def test_a_trials_fingerprint_covers_code_locks_data_and_params(tmp_path):
    files = _project(tmp_path)
    (tmp_path / "requirements").mkdir()
    (tmp_path / "requirements" / "lock.txt").write_text("torch==2.5.1\n")
    base = trial_provenance(files, tmp_path, "data1", {"engine": "peft", "grit": True})
    assert base["files"] == files and base["data"] == "data1"
    other_params = trial_provenance(files, tmp_path, "data1", {"engine": "peft", "grit": False})
    assert other_params["setup"] == base["setup"] and other_params["fingerprint"] != base["fingerprint"]
    assert trial_provenance(files, tmp_path, "data2", {"engine": "peft", "grit": True})["setup"] != base["setup"]
    (tmp_path / "requirements" / "lock.txt").write_text("torch==2.6.0\n")
    assert trial_provenance(files, tmp_path, "data1", {"engine": "peft", "grit": True})["setup"] != base["setup"]


def test_the_lock_files_are_those_the_environment_check_compares():
    import importlib.util

    spec = importlib.util.spec_from_file_location("check_lock", REPO_ROOT / "scripts/check_lock.py")
    check_lock = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check_lock)
    assert set(check_lock.REQUIREMENTS) <= set(LOCK_FILES)
    assert all((REPO_ROOT / name).is_file() for name in LOCK_FILES)


def test_git_status_is_read_with_untracked_files_and_both_sides_of_a_rename():
    porcelain = "\0".join([" M trainers/recipe.py", "?? notes/new file.py", "R  core/new.py", "core/old.py",
                           " D db/gone.py", ""])
    assert changed_paths(porcelain) == ["trainers/recipe.py", "notes/new file.py", "core/new.py", "core/old.py",
                                        "db/gone.py"]


def test_dirty_loaded_files_are_the_changes_that_touch_what_trials_loaded():
    loaded = ["trainers/recipe.py", "core/files.py", "reports/study/ledger/trials.jsonl"]
    changes = ["trainers/recipe.py", "docs/study.md", "reports/study/ledger/trials.jsonl", "core/new.py"]
    assert dirty_loaded_files(loaded, changes) == ["trainers/recipe.py"]
    assert dirty_loaded_files(loaded, []) == []


def _git(root: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=root, check=True,
                   capture_output=True)


def test_a_change_to_a_loaded_training_file_refuses_the_sitting_and_the_mixed_report(tmp_path):
    """Constructed data: trials of a ledger loaded trainers/recipe.py; the working tree then
    changes it. The sitting refuses in one line; trained anyway (committed), the later trial's
    setup differs and the report will not compare it with the earlier part."""
    files = _project(tmp_path)
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "commit", "-qm", "study code")
    earlier = {"method": "pure_grit", "provenance": trial_provenance(files, tmp_path, "d", {"grit": True})}
    check_sitting_may_start([earlier], working_tree_changes(tmp_path), "abc123")     # clean: may start

    (tmp_path / "trainers" / "recipe.py").write_text("STEP = 'precondition'\n")
    (tmp_path / "scratch.txt").write_text("untracked, loaded by nobody\n")
    with pytest.raises(ProvenanceError, match=r"changes 1 file that earlier trials of study abc123 needed "
                                              r"\(trainers/recipe.py\)") as refused:
        check_sitting_may_start([earlier, {"method": "peft_lora"}], working_tree_changes(tmp_path), "abc123")
    assert "\n" not in str(refused.value)
    # a record from before the closure names what its process had loaded: it refuses the same
    before = {"method": "pure_grit", "provenance": {"setup": "s", "loaded": ["trainers/recipe.py"]}}
    with pytest.raises(ProvenanceError, match=r"\(trainers/recipe.py\)"):
        check_sitting_may_start([before], working_tree_changes(tmp_path), "abc123")

    later = trial_provenance(files, tmp_path, "d", {"grit": False})
    assert later["setup"] != earlier["provenance"]["setup"]
    with pytest.raises(ProvenanceError) as mixed:
        check_one_setup({"pure_grit@200": [earlier["provenance"]["setup"]], "peft_lora@200": [later["setup"]]})
    assert earlier["provenance"]["setup"] in str(mixed.value) and later["setup"] in str(mixed.value)
    assert check_one_setup({"a": [later["setup"], None], "b": [later["setup"]]}) == later["setup"]
    assert check_one_setup({"a": [None]}) is None


def test_a_checkout_without_git_has_no_changes_to_read(tmp_path):
    assert working_tree_changes(tmp_path) is None
