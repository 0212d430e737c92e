"""A temporary git copy of the repository with params.yaml composed from a profile, and a shell
helper that fails with the command's output: what every whole-pipeline test starts from."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path


def _sh(args: list[str], cwd: Path, env: dict[str, str], timeout: int = 1200) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _digests(repo: Path, paths: list[str]) -> dict[str, str]:
    """sha256 of every file under ``paths`` (files or folders), by relative path."""
    found = {}
    for name in paths:
        root = repo / name
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        found |= {str(f.relative_to(repo)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}
    assert found, paths
    return found


REPO_ROOT = Path(__file__).resolve().parent.parent


def repo_copy(tmp_path_factory, profile: list[str], repo_root: Path = REPO_ROOT):
    """A git copy of the working tree (tracked + untracked, not ignored) with params.yaml = profile."""
    copy = tmp_path_factory.mktemp("pipeline") / "repo"
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=repo_root, capture_output=True, text=True, check=True,
    ).stdout.split("\0")
    for name in filter(None, listed):
        source = repo_root / name
        if source.is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, copy / name)
    # OLLAMA_HOST: a port nothing listens on, so a developer's own Ollama is never written to.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "OLLAMA_HOST": "http://127.0.0.1:9",
           "PYTHONPATH": str(copy)}
    git = ["git", "-c", "user.email=ci@example.invalid", "-c", "user.name=ci"]
    _sh(["git", "init", "-q"], copy, env)
    _sh([*git, "add", "-A"], copy, env)
    _sh([*git, "commit", "-qm", "snapshot"], copy, env)
    _sh([sys.executable, "-m", "pipelines.profile", *profile], copy, env)
    return copy, env
