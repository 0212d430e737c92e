"""llama.cpp tooling pinned to the llama-cpp-python runtime the project serves with.

The converters (``convert_lora_to_gguf.py``, ``convert_hf_to_gguf.py``, their ``conversion``
package and ``gguf-py``) are taken from the *same* llama-cpp-python sdist that the runtime wheel
is built from, so a GGUF written by the converter is always one the runtime can load.

Set-up (``python -m export.llama_cpp setup``, run by ``make setup``):
  1. download the pinned sdist from PyPI into the cache (once);
  2. build a wheel from it into the cache (once; about 6.5 min on 2 cores) and install it;
  3. extract the converters into ``<cache>/llama.cpp-<version>/``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pipelines.errors import UserError
from pipelines.files import cache_dir, sha256_file

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
SDIST_NAME = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
_VENDOR = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"
_CONVERTER_FILES = ("convert_lora_to_gguf.py", "convert_hf_to_gguf.py")
_CONVERTER_DIRS = ("conversion/", "gguf-py/")
CONVERTERS: dict[str, str] = {"lora": "convert_lora_to_gguf.py", "hf": "convert_hf_to_gguf.py"}


class LlamaCppSetupError(UserError):
    pass


def sdist_path() -> Path:
    return cache_dir() / "sdist" / SDIST_NAME


def wheel_dir() -> Path:
    return cache_dir() / "wheels"


def converters_dir() -> Path:
    return cache_dir() / f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}"


@dataclass(frozen=True)
class ConverterCommand:
    """How to run one llama.cpp converter: ``subprocess.run(cmd.argv + args, env=cmd.env)``."""

    argv: list[str]
    env: dict[str, str] = field(repr=False)

    def run(self, *args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.argv, *map(str, args)], env=self.env, check=check, capture_output=True, text=True
        )


def converter(name: Literal["lora", "hf"]) -> ConverterCommand:
    """The command that runs llama.cpp's ``convert_<name>_to_gguf.py`` from the pinned sdist."""
    if name not in CONVERTERS:
        raise ValueError(f"unknown converter {name!r}; expected one of {sorted(CONVERTERS)}")
    root = converters_dir()
    script = root / CONVERTERS[name]
    if not script.is_file():
        raise LlamaCppSetupError(
            f"llama.cpp converter {script} is missing; run `make setup` "
            "(python -m export.llama_cpp setup) to extract it from the pinned sdist"
        )
    env = dict(os.environ)
    # The vendored gguf-py must shadow the PyPI ``gguf``: it is the writer this runtime reads.
    env["PYTHONPATH"] = os.pathsep.join(
        [str(root / "gguf-py"), str(root), *filter(None, [env.get("PYTHONPATH")])]
    )
    return ConverterCommand(argv=[sys.executable, str(script)], env=env)


def download_sdist() -> Path:
    """The pinned sdist in the cache, downloaded once and checked against its sha256."""
    target = sdist_path()
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        # --no-binary for this package only: its build dependencies may come as wheels
        # (a global --no-binary would compile cmake and friends from source).
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python",
             "-d", str(target.parent), f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"],
            check=True,
        )
    if not target.is_file():
        raise LlamaCppSetupError(f"pip did not produce {target}")
    if sha256_file(target) != SDIST_SHA256:
        target.unlink()
        raise LlamaCppSetupError(f"{target} does not match the pinned sha256; removed it, run `make setup` again")
    return target


def _member_wanted(name: str) -> bool:
    if not name.startswith(_VENDOR):
        return False
    relative = name[len(_VENDOR):]
    return relative in _CONVERTER_FILES or relative.startswith(_CONVERTER_DIRS)


def extract_converters(sdist: Path) -> Path:
    """Unpack the converters from ``sdist`` into :func:`converters_dir` (atomically)."""
    final = converters_dir()
    if all((final / f).is_file() for f in _CONVERTER_FILES):
        return final
    tmp = final.with_name(final.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(sdist) as archive:
        members = [m for m in archive.getmembers() if _member_wanted(m.name) and m.isfile()]
        for member in members:
            member.name = member.name[len(_VENDOR):]
            archive.extract(member, tmp, filter="data")
    missing = [f for f in _CONVERTER_FILES if not (tmp / f).is_file()]
    if missing:
        raise LlamaCppSetupError(f"{sdist} does not contain {missing}; is it a llama-cpp-python sdist?")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def cached_wheel() -> Path | None:
    wheels = sorted(wheel_dir().glob(f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}-*.whl"))
    return wheels[-1] if wheels else None


def build_wheel(sdist: Path) -> Path:
    """Build the runtime wheel from the sdist once; later set-ups reuse it from the cache."""
    wheel = cached_wheel()
    if wheel is not None:
        return wheel
    wheel_dir().mkdir(parents=True, exist_ok=True)
    print(f"building llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} from source (about 6-7 min on 2 cores)")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(wheel_dir()), str(sdist)],
        check=True,
    )
    wheel = cached_wheel()
    if wheel is None:
        raise LlamaCppSetupError(f"building {sdist} produced no wheel in {wheel_dir()}")
    return wheel


def runtime_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("llama_cpp_python")
    except Exception:  # noqa: BLE001 - not installed
        return None


def setup() -> None:
    sdist = download_sdist()
    if runtime_version() != LLAMA_CPP_PYTHON_VERSION:
        wheel = build_wheel(sdist)
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", str(wheel)], check=True)
    extract_converters(sdist)
    print(f"llama.cpp {LLAMA_CPP_PYTHON_VERSION}: runtime installed, converters in {converters_dir()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.llama_cpp")
    parser.add_argument("action", choices=["setup", "where"])
    args = parser.parse_args(argv)
    if args.action == "setup":
        setup()
    else:
        print(converters_dir())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
