"""The project installs as a package: a non-editable ``pip install .`` into a fresh virtual
environment holds every package and the data files they read (the store's migrations)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("core", "db", "trainers", "export", "profiling", "evaluation", "pipelines")


def _run(args: list, cwd: Path) -> str:
    done = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{args}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.mark.slow
def test_a_non_editable_install_imports_every_package_and_opens_a_store(tmp_path: Path):
    # the wheel, built with the build backend already installed from a copy of the tracked files
    # (setuptools writes build/ and *.egg-info/ into the tree it builds)
    source = tmp_path / "source"
    tracked = _run(["git", "ls-files", "-z"], REPO_ROOT).split("\0")
    for name in filter(None, tracked):
        if (REPO_ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / name, source / name)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", tmp_path / "dist",
          source], tmp_path)
    (wheel,) = (tmp_path / "dist").glob("grit_lora_pipeline-*.whl")
    fresh = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", fresh], tmp_path)
    _run([fresh / "bin/python", "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", wheel], tmp_path)
    # the project's dependencies come from this environment (a .pth file), the project from the wheel
    site = Path(_run([fresh / "bin/python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                     tmp_path).strip())
    (site / "project-dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    check = (f"import {', '.join(PACKAGES)}\n"
             "from pathlib import Path\n"
             f"for package in ({', '.join(PACKAGES)}):\n"
             f"    assert Path(package.__file__).is_relative_to({str(site)!r}), package.__file__\n"
             "from db.store import open_store\n"
             "open_store('sqlite:///store.db', Path.cwd())\n"
             "print('imported and migrated')\n")
    elsewhere = tmp_path / "elsewhere"       # not the repository: nothing may come from the source tree
    elsewhere.mkdir()
    assert "imported and migrated" in _run([fresh / "bin/python", "-c", check], elsewhere)
    assert (elsewhere / "store.db").is_file()
