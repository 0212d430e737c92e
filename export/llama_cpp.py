"""llama.cpp tooling pinned to the llama-cpp-python runtime the project serves with.

The converters (``convert_lora_to_gguf.py``, ``convert_hf_to_gguf.py``, their ``conversion``
package and ``gguf-py``) are taken from the *same* llama-cpp-python sdist that the runtime wheel
is built from, so a GGUF written by the converter is always one the runtime can load.

Set-up (``python -m export.llama_cpp setup``, run by ``make setup``):
  1. download the pinned sdist from PyPI into the cache (once);
  2. build a wheel from it with the CMake flags of :func:`build_plan` into a cache folder keyed by
     those flags and the version (once; about 6.5 min on 2 cores) and install it;
  3. extract the converters into ``<cache>/llama.cpp-<version>/``;
  4. generate a few tokens of the packaged model in a child process (:func:`smoke_check`): a
     runtime that dies there (an instruction the host advertises but does not allow) is removed
     from the cache and the set-up fails with one line that says why.

The build is portable by default: an explicit instruction-set level instead of llama.cpp's
``-march=native``, so a wheel in a shared cache runs on every CPU of that level.
``GRIT_LLAMA_BUILD=native`` opts in to a build for this host's CPU (keyed by its CPU flags).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from core.errors import UserError, exit_status
from core.files import cache_dir, sha256_file

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


# --- Build flavour: the CMake flags of the runtime, written once ---------------------------------

BUILD_ENV = "GRIT_LLAMA_BUILD"
BUILD_CHOICES = ("portable", "native", "cuda")
# The cuda flavour: the portable CPU flags plus CUDA kernels for named GPU generations (Ampere,
# Ada, Hopper), never the build host's own GPU ("native"), so its wheel serves any of them.
_CUDA = ("-DGGML_CUDA=ON", "-DCMAKE_CUDA_ARCHITECTURES=80;86;89;90")
# x86-64-v3 in /proc/cpuinfo's names: what the portable build uses when the host has all of it.
_X86_64_V3_FLAGS = frozenset({"avx", "avx2", "fma", "f16c", "bmi2"})
# Never compiled into a portable build: a VM may advertise them through CPUID yet fault on them
# (AMX tile state is a per-process permission the kernel may refuse).
_OFF_IN_PORTABLE = ("AVX_VNNI", "AVX512", "AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16",
                    "AMX_TILE", "AMX_INT8", "AMX_BF16", "CPU_ALL_VARIANTS", "BACKEND_DL")
# Only the libraries the Python binding loads for text models: the multimodal library (mtmd,
# the binding's llava/mtmd modules, imported only for image chat handlers the project never
# uses) is most of the compile time left after llama and ggml.
_TEXT_ONLY = ("-DLLAVA_BUILD=OFF",)


@dataclass(frozen=True)
class BuildPlan:
    """How the runtime wheel is compiled: ``label`` names the instruction-set level, ``key`` is
    the cache folder (version + label + a hash of the exact flags)."""

    label: str
    cmake_args: tuple[str, ...]

    @property
    def key(self) -> str:
        digest = hashlib.sha256(
            "\n".join((LLAMA_CPP_PYTHON_VERSION, *self.cmake_args)).encode()
        ).hexdigest()[:12]
        return f"{LLAMA_CPP_PYTHON_VERSION}-{self.label}-{digest}"


def _ggml(options: dict[str, bool]) -> tuple[str, ...]:
    return tuple(f"-DGGML_{name}={'ON' if on else 'OFF'}" for name, on in options.items())


def build_plan(flavour: str, machine: str, cpu_flags: frozenset[str]) -> BuildPlan:
    """CMake flags for ``flavour`` ("portable" or "native") on a host with ``machine``
    (``uname -m``) and ``cpu_flags`` (/proc/cpuinfo).

    portable, x86_64: x86-64-v3 (AVX2, FMA, F16C, BMI2) when the host has it, else x86-64-v2
    (SSE4.2), never AVX-512 or AMX. portable, other machines: the compiler's generic target.
    native: llama.cpp's ``-march=native``; keyed by the host's CPU flags, so a shared cache
    never hands it to another CPU model. cuda: the portable plan plus CUDA kernels for named GPU
    generations (its own label, so its wheel is cached apart and never mixed with the CPU one;
    needs the CUDA toolkit's nvcc at set-up). Every flavour builds the text libraries only.
    """
    if flavour not in BUILD_CHOICES:
        raise LlamaCppSetupError(f"{BUILD_ENV}={flavour!r} is not one of {', '.join(BUILD_CHOICES)}; "
                                 "unset it for the portable build")
    if flavour == "native":
        host = hashlib.sha256(" ".join(sorted(cpu_flags)).encode()).hexdigest()[:8]
        return BuildPlan(f"native-{machine}-{host}", ("-DGGML_NATIVE=ON", *_TEXT_ONLY))
    if flavour == "cuda":
        cpu = build_plan("portable", machine, cpu_flags)
        return BuildPlan(f"{cpu.label}-cuda", cpu.cmake_args + _CUDA)
    if machine not in ("x86_64", "AMD64"):
        return BuildPlan(f"generic-{machine}", ("-DGGML_NATIVE=OFF", *_TEXT_ONLY))
    v3 = _X86_64_V3_FLAGS <= cpu_flags
    wanted = {"NATIVE": False, "SSE42": True, "AVX": v3, "AVX2": v3, "FMA": v3, "F16C": v3, "BMI2": v3}
    return BuildPlan("x86-64-v3" if v3 else "x86-64-v2",
                     _ggml(wanted) + _ggml(dict.fromkeys(_OFF_IN_PORTABLE, False)) + _TEXT_ONLY)


def host_cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The first ``flags`` line of /proc/cpuinfo (empty where there is none)."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def host_build_plan() -> BuildPlan:
    return build_plan(os.environ.get(BUILD_ENV) or "portable", platform.machine(), host_cpu_flags())


def plan_wheel_dir(plan: BuildPlan) -> Path:
    return wheel_dir() / plan.key


def cached_wheel(plan: BuildPlan) -> Path | None:
    wheels = sorted(plan_wheel_dir(plan).glob(f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}-*.whl"))
    return wheels[-1] if wheels else None


def build_wheel(sdist: Path, plan: BuildPlan) -> Path:
    """Build the runtime wheel from the sdist once per plan; later set-ups reuse it."""
    wheel = cached_wheel(plan)
    if wheel is not None:
        return wheel
    target = plan_wheel_dir(plan)
    partial = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    print(f"building llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} ({plan.label}) from source "
          "(about 5 min on 2 cores)", flush=True)
    # CMAKE_ARGS is how llama-cpp-python's scikit-build passes options to llama.cpp's CMake.
    env = {**os.environ, "CMAKE_ARGS": " ".join(plan.cmake_args)}
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir", "-w", str(partial),
                    str(sdist)], check=True, env=env)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)  # the folder appears only with a complete wheel in it
    wheel = cached_wheel(plan)
    if wheel is None:
        raise LlamaCppSetupError(f"building {sdist} produced no wheel in {target}")
    return wheel


def install_stamp() -> Path:
    """Which build plan the environment's runtime came from (a version alone does not say)."""
    return Path(sys.prefix) / "llama-cpp-build.txt"


def installed_plan_key() -> str | None:
    stamp = install_stamp()
    return stamp.read_text().strip() if stamp.is_file() and runtime_version() == LLAMA_CPP_PYTHON_VERSION else None


def runtime_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("llama_cpp_python")
    except Exception:  # noqa: BLE001 - not installed
        return None


# --- Smoke check: does the runtime generate on this host? ---------------------------------------

SMOKE_PROMPT = "The capital of France is"
SMOKE_TIMEOUT_S = 300


class RuntimeCheckError(LlamaCppSetupError):
    pass


def _smoke_generate(model: Path) -> None:
    """Child-process side: greedy-decode a few tokens and print them (may die by a signal)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(model), n_ctx=128, seed=0, verbose=False)
    out = llm(SMOKE_PROMPT, max_tokens=8, temperature=0.0, top_k=1)
    print(out["choices"][0]["text"].strip(), flush=True)


def describe_smoke_failure(returncode: int, stdout: str, stderr: str) -> str | None:
    """One line saying why a smoke generation failed, or None when it printed sensible text."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return (f"the llama.cpp runtime died with {name} on its first generation: the build likely uses "
                "CPU instructions this host advertises but does not allow (AMX or AVX-512 in a VM); "
                f"rebuild it portable with `{BUILD_ENV}=portable make setup` (the default)")
    if returncode != 0:
        last = next((line for line in reversed(stderr.splitlines()) if line.strip()), "no output")
        return f"the llama.cpp smoke generation failed (exit {returncode}): {last.strip()}"
    text = stdout.strip()
    if sum(ch.isalpha() for ch in text) < 2:
        return (f"the llama.cpp smoke generation printed nothing sensible ({text[:40]!r}): the runtime "
                f"computes garbage on this host; rebuild it portable with `{BUILD_ENV}=portable make setup`")
    return None


def smoke_check(model: Path | None = None) -> str:
    """Generate from the packaged model in a child process; the generated text, or
    :class:`RuntimeCheckError` with one line naming the signal, the likely cause and the fix."""
    if model is None:
        from trainers.base_model import embedded_gguf_path

        model = embedded_gguf_path()
    try:
        done = subprocess.run([sys.executable, "-m", "export.llama_cpp", "generate", str(model)],
                              capture_output=True, text=True, timeout=SMOKE_TIMEOUT_S,
                              cwd=Path(__file__).resolve().parent.parent)
    except subprocess.TimeoutExpired:
        raise RuntimeCheckError(f"the llama.cpp smoke generation did not finish in {SMOKE_TIMEOUT_S} s") from None
    problem = describe_smoke_failure(done.returncode, done.stdout, done.stderr)
    if problem is not None:
        raise RuntimeCheckError(problem)
    return done.stdout.strip()


def _host_key() -> str:
    """This host and this runtime: a verdict cached under it holds until either changes."""
    parts = (installed_plan_key() or "unstamped", runtime_version() or "", platform.node(), platform.release(),
             " ".join(sorted(host_cpu_flags())), sys.prefix)
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def require_working_runtime() -> None:
    """Stages that run llama.cpp in-process call this first, so a runtime that would die by a
    signal mid-stage (DVC's bare "exited with -11") fails up front with one line instead.
    The verdict is cached per host and runtime, so it costs one short generation per host."""
    verdict = cache_dir() / "runtime-checks" / f"{_host_key()}.ok"
    if verdict.is_file():
        return
    smoke_check()
    verdict.parent.mkdir(parents=True, exist_ok=True)
    verdict.touch()


def discard_if_broken(plan: BuildPlan, stamp: Path) -> str:
    """The smoke generation's text; when it fails, the plan's cached wheel and the install
    ``stamp`` go first (a broken runtime must not be reused: the next set-up rebuilds it)."""
    try:
        return smoke_check()
    except RuntimeCheckError:
        shutil.rmtree(plan_wheel_dir(plan), ignore_errors=True)
        stamp.unlink(missing_ok=True)
        raise


def setup() -> None:
    sdist = download_sdist()
    plan = host_build_plan()
    # Wheels cached before builds were keyed by their flags: of unknown (native) flags, never reused.
    for legacy in wheel_dir().glob("llama_cpp_python-*.whl"):
        legacy.unlink()
    if installed_plan_key() != plan.key:
        wheel = build_wheel(sdist, plan)
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--force-reinstall", str(wheel)],
                       check=True)
        install_stamp().write_text(plan.key + "\n")
    extract_converters(sdist)
    text = discard_if_broken(plan, install_stamp())
    print(f"llama.cpp {LLAMA_CPP_PYTHON_VERSION} ({plan.label}): runtime installed, converters in "
          f"{converters_dir()}; smoke generation: {SMOKE_PROMPT} ... {text!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.llama_cpp")
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("setup", help="build (once) and install the runtime, extract the converters, smoke-check")
    sub.add_parser("where", help="print the converters' folder")
    sub.add_parser("check", help="smoke-check the installed runtime on this host")
    sub.add_parser("plan", help="print the build plan for this host")
    generate = sub.add_parser("generate", help=argparse.SUPPRESS)
    generate.add_argument("model", type=Path)
    args = parser.parse_args(argv)

    def plan() -> None:
        chosen = host_build_plan()
        print(f"{chosen.label}  {chosen.key}\n{' '.join(chosen.cmake_args)}")

    actions = {"setup": setup, "check": lambda: print(smoke_check()), "where": lambda: print(converters_dir()),
               "plan": plan, "generate": lambda: _smoke_generate(args.model)}
    return exit_status(actions[args.action])


if __name__ == "__main__":
    raise SystemExit(main())
