"""Small file helpers shared by every stage: content hashes and atomic writes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any


def cache_dir() -> Path:
    """Root of the project's content-keyed cache (``GRIT_CACHE_DIR``, else ~/.cache/grit-lora).

    Holds what is expensive to rebuild and keyed by content: the de-quantized base model, the
    tiny test model, the llama-cpp-python sdist, its built wheel and the extracted converters.
    """
    return Path(os.environ.get("GRIT_CACHE_DIR") or Path.home() / ".cache" / "grit-lora")


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so readers never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_write_json(path: Path, payload: Any) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def fresh_staging_dir(final: Path) -> Path:
    """An empty sibling of ``final`` to write a whole directory into before publishing it."""
    staging = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def publish_directory(staging: Path, final: Path) -> Path:
    """Put a fully written ``staging`` directory in place of ``final`` by renames only, so a
    failure before this call leaves the previous ``final`` exactly as it was."""
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        final.rename(old)
        staging.rename(final)
        shutil.rmtree(old)
    else:
        staging.rename(final)
    return final


def files_under(folder: Path, prefix: str = "") -> dict[str, Path]:
    """Every file below ``folder`` by its relative path (with ``prefix``): a stage's artifacts."""
    return {f"{prefix}{p.relative_to(folder)}": p for p in sorted(folder.rglob("*")) if p.is_file()}
