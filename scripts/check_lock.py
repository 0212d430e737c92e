"""Prove that the installed environment is the locked one: print every difference, exit 1 if any.

What pip installs depends on more than the requirement files (its config, find-links, an extra
index, a wheel cache): this check compares the interpreter's installed distributions with the
pins of ``requirements/lock.txt``, ``no-deps.txt`` and ``test.txt``, plus the two pins that live
in code (pip in ``scripts/setup.sh``, llama-cpp-python in ``export/llama_cpp.py``). The project
itself, installed editable, is the only other distribution allowed.

    python scripts/check_lock.py          # run by scripts/setup.sh after every install
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = ("requirements/lock.txt", "requirements/no-deps.txt", "requirements/test.txt")
PROJECT = "grit-lora-pipeline"


def canonical(name: str) -> str:
    """PEP 503 normalised name: ``Unsloth_Zoo`` and ``unsloth-zoo`` are one distribution."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pins_in(text: str) -> dict[str, str]:
    """``name==version`` lines of a requirements file (comments and blank lines skipped)."""
    pins = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep:
            raise ValueError(f"not an exact pin: {line!r}")
        pins[canonical(name.split("[", 1)[0])] = version.strip()
    return pins


def code_pins(root: Path) -> dict[str, str]:
    """The pins that live in code rather than in a requirements file."""
    setup = (root / "scripts/setup.sh").read_text()
    llama = (root / "export/llama_cpp.py").read_text()
    return {"pip": re.search(r"pip==([\w.]+)", setup).group(1),
            "llama-cpp-python": re.search(r'LLAMA_CPP_PYTHON_VERSION = "([\w.]+)"', llama).group(1)}


def locked(root: Path = ROOT) -> dict[str, str]:
    pins: dict[str, str] = {}
    for name in REQUIREMENTS:
        pins |= pins_in((root / name).read_text())
    return pins | code_pins(root)


def installed() -> dict[str, str]:
    return {canonical(d.metadata["Name"]): d.version for d in metadata.distributions()}


def differences(want: dict[str, str], have: dict[str, str]) -> list[str]:
    """One line per difference, sorted: missing, other version, or not in the lock."""
    lines = []
    for name in sorted(want.keys() | have.keys()):
        if name == PROJECT:
            continue
        if name not in have:
            lines.append(f"missing     {name}=={want[name]}")
        elif name not in want:
            lines.append(f"not locked  {name}=={have[name]}")
        elif have[name] != want[name]:
            lines.append(f"other       {name}=={have[name]} (locked {want[name]})")
    return lines


def main() -> int:
    found = differences(locked(), installed())
    for line in found:
        print(line)
    if found:
        print(f"error: the environment differs from the lock in {len(found)} package(s) (above); "
              "remove .venv and run `make setup` again, or regenerate the lock with scripts/lock.sh",
              file=sys.stderr)
        return 1
    print(f"[setup] the environment equals the lock ({len(locked())} packages)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
