"""Shared fixtures: the repository root and a params file builder."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
for path in (REPO_ROOT, REPO_ROOT / "tests"):  # the code, and test helpers such as tiny_lora
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture
def write_params(tmp_path: Path):
    """Write a params mapping as YAML in a temp dir and return its path."""

    def write(payload: object, name: str = "params.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(payload) if not isinstance(payload, str) else payload)
        return path

    return write
