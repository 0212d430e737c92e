"""The llama.cpp runtime is portable by default, and a runtime that dies on this host is named
in one line (set-up and stages) instead of a bare "exited with -11"."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from export import llama_cpp
from export.llama_cpp import (
    BuildPlan,
    RuntimeCheckError,
    build_plan,
    describe_smoke_failure,
    discard_if_broken,
    host_cpu_flags,
    require_working_runtime,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
X86_64_V3 = frozenset({"sse4_2", "avx", "avx2", "fma", "f16c", "bmi2"})
# The host of the bug report: AVX-512 and AMX advertised by CPUID, AMX not allowed by the VM.
AMX_HOST = X86_64_V3 | {"avx512f", "avx512bw", "avx512_vnni", "amx_tile", "amx_int8", "amx_bf16"}


def _crashing_runtime(folder: Path, how: str = "os.kill(os.getpid(), signal.SIGSEGV)") -> Path:
    """A stand-in ``llama_cpp`` package whose model load does ``how`` (a segfault by default)."""
    package = folder / "llama_cpp"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        "import os, signal\n\n\nclass Llama:\n    def __init__(self, *args, **kwargs):\n"
        f"        {how}\n\n    def __call__(self, *args, **kwargs):\n"
        "        return {'choices': [{'text': ' \\ufffd\\ufffd'}]}\n"
    )
    return folder


def _env_with(standin: Path, cache: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(standin), str(REPO_ROOT)]), "GRIT_CACHE_DIR": str(cache)}


# --- the build flags ---------------------------------------------------------------------------

def test_the_portable_build_never_compiles_avx512_or_amx_even_where_the_host_advertises_them():
    plan = build_plan("portable", "x86_64", AMX_HOST)
    assert plan.label == "x86-64-v3"
    on = {a for a in plan.cmake_args if a.endswith("=ON")}
    assert "-DGGML_NATIVE=OFF" in plan.cmake_args and "-DGGML_AVX2=ON" in on
    assert not [a for a in on if "AVX512" in a or "AMX" in a or "NATIVE" in a or "ALL_VARIANTS" in a]
    # The same flags on every host of that level: a shared cache may hand the wheel around.
    assert build_plan("portable", "x86_64", X86_64_V3) == plan


def test_hosts_without_avx2_get_the_sse42_level_and_other_machines_the_generic_target():
    plan = build_plan("portable", "x86_64", frozenset({"sse4_2", "avx"}))
    assert plan.label == "x86-64-v2" and "-DGGML_AVX2=OFF" in plan.cmake_args and "-DGGML_AVX=OFF" in plan.cmake_args
    assert build_plan("portable", "aarch64", frozenset()).cmake_args == ("-DGGML_NATIVE=OFF", "-DLLAVA_BUILD=OFF")


def test_the_wheel_cache_key_holds_the_version_and_the_flags():
    portable = build_plan("portable", "x86_64", X86_64_V3)
    native = build_plan("native", "x86_64", X86_64_V3)
    other_cpu = build_plan("native", "x86_64", AMX_HOST)
    assert len({portable.key, native.key, other_cpu.key}) == 3  # a native wheel never meets another CPU
    assert portable.key.startswith(f"{llama_cpp.LLAMA_CPP_PYTHON_VERSION}-x86-64-v3-")
    assert BuildPlan("x", ("-DA=ON",)).key != BuildPlan("x", ("-DA=OFF",)).key


def test_the_cuda_flavour_is_the_portable_plan_plus_cuda_flags_only_and_is_cached_apart():
    """GRIT_LLAMA_BUILD=cuda (a GPU host's serving): the same pinned sdist and the same portable CPU
    flags, plus CUDA kernels for named GPU generations, never the build host's own GPU."""
    for flags in (X86_64_V3, frozenset({"sse4_2"})):
        portable, cuda = build_plan("portable", "x86_64", flags), build_plan("cuda", "x86_64", flags)
        assert cuda.cmake_args[:len(portable.cmake_args)] == portable.cmake_args
        added = cuda.cmake_args[len(portable.cmake_args):]
        assert added and all("CUDA" in arg for arg in added) and not any("native" in arg for arg in added)
        assert cuda.label == f"{portable.label}-cuda" and cuda.key != portable.key


def test_an_unknown_build_choice_is_one_line():
    with pytest.raises(llama_cpp.LlamaCppSetupError, match="GRIT_LLAMA_BUILD='fast' is not one of portable, native"):
        build_plan("fast", "x86_64", X86_64_V3)


def _objdump_lines(library: Path) -> list[str]:
    done = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(library)], capture_output=True, text=True,
                          check=True)
    return done.stdout.splitlines()


def test_the_installed_runtime_is_the_portable_build_of_this_host():
    """Set-up installed the wheel of the portable plan (on a host without AVX-512 a native build
    disassembles much like a portable one, so the instructions alone cannot tell)."""
    plan = build_plan("portable", platform.machine(), host_cpu_flags())
    assert llama_cpp.installed_plan_key() == plan.key, "the installed llama.cpp runtime is not the portable build"


def test_served_models_offload_to_a_gpu_exactly_when_the_runtime_is_the_cuda_build():
    """export.backend asks the runtime itself whether it can offload: only the cuda flavour's
    wheel can, so with the portable build every served model stays on the CPU (n_gpu_layers 0,
    as before the cuda flavour existed)."""
    from export.backend import serving_device

    cuda = build_plan("cuda", platform.machine(), host_cpu_flags())
    assert serving_device() == ("gpu" if llama_cpp.installed_plan_key() == cuda.key else "cpu") == "cpu"


def test_the_installed_cpu_backend_has_no_amx_or_avx512_instructions():
    """A regression to native flags fails here on any host with AVX-512 or AMX."""
    import llama_cpp as runtime

    libraries = sorted(Path(runtime.__file__).parent.rglob("libggml-cpu*.so*"))
    assert libraries, "libggml-cpu is not in the installed llama_cpp package"
    lines = [line for library in libraries for line in _objdump_lines(library)]
    assert len(lines) > 10_000  # a real disassembly, not an empty one
    amx = [line for line in lines
           if any(op in line for op in ("ldtilecfg", "tileloadd", "tdpb", "tilestored", "tilezero"))]
    zmm = [line for line in lines if "%zmm" in line]
    assert not amx and not zmm, (amx + zmm)[:5]
    assert any("%ymm" in line for line in lines)  # the x86-64-v3 level is really there (AVX2)


# --- the smoke check -----------------------------------------------------------------------------

def test_smoke_failures_are_described_in_one_line():
    segv = describe_smoke_failure(-11, "", "")
    assert "SIGSEGV" in segv and "AMX" in segv and "GRIT_LLAMA_BUILD=portable make setup" in segv
    assert "SIGILL" in describe_smoke_failure(-4, "", "")
    assert "(exit 1): ImportError: boom" in describe_smoke_failure(1, "", "Traceback\nImportError: boom\n")
    assert "nothing sensible" in describe_smoke_failure(0, " \ufffd\ufffd\n", "")
    assert describe_smoke_failure(0, "Paris, the city of light.", "") is None
    for message in (segv, describe_smoke_failure(0, "", "")):
        assert "\n" not in message


def test_a_runtime_dying_by_sigsegv_fails_the_check_with_one_line_and_a_nonzero_exit(tmp_path: Path):
    standin = _crashing_runtime(tmp_path / "standin")
    done = subprocess.run([sys.executable, "-m", "export.llama_cpp", "check"], cwd=REPO_ROOT,
                          env=_env_with(standin, tmp_path / "cache"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the llama.cpp runtime died with SIGSEGV"), done.stderr
    assert "GRIT_LLAMA_BUILD=portable" in lines[0]


def test_set_up_removes_a_broken_runtime_from_the_cache(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("GRIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(_crashing_runtime(tmp_path / "standin")), str(REPO_ROOT)]))
    plan = build_plan("portable", "x86_64", X86_64_V3)
    wheel = llama_cpp.plan_wheel_dir(plan) / (f"llama_cpp_python-{llama_cpp.LLAMA_CPP_PYTHON_VERSION}"
                                              "-cp311-cp311-linux_x86_64.whl")
    wheel.parent.mkdir(parents=True)
    wheel.write_bytes(b"a broken build")
    stamp = tmp_path / "llama-cpp-build.txt"
    stamp.write_text(plan.key)
    with pytest.raises(RuntimeCheckError, match="SIGSEGV"):
        discard_if_broken(plan, stamp)
    assert not wheel.parent.exists() and not stamp.exists()  # the next `make setup` rebuilds


def test_stages_check_the_runtime_up_front_and_cache_a_good_verdict(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("GRIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(_crashing_runtime(tmp_path / "standin")), str(REPO_ROOT)]))
    with pytest.raises(RuntimeCheckError, match="SIGSEGV"):
        require_working_runtime()
    assert not (tmp_path / "cache" / "runtime-checks").exists()  # a failure is never cached
    monkeypatch.setenv("PYTHONPATH", str(REPO_ROOT))  # the real runtime
    require_working_runtime()
    verdicts = list((tmp_path / "cache" / "runtime-checks").glob("*.ok"))
    assert len(verdicts) == 1
    # Cached: even a runtime that would now crash is not run again on this host.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path / "standin"), str(REPO_ROOT)]))
    require_working_runtime()


def test_a_stage_on_a_host_where_llama_cpp_dies_fails_in_one_line(tmp_path: Path, write_params):
    """prepare_data of the embedded model: 'error: ... SIGSEGV ...' and exit 2, not DVC's bare -11."""
    standin = _crashing_runtime(tmp_path / "standin")
    params = write_params({"profile": "default"})
    done = subprocess.run([sys.executable, "-m", "pipelines.prepare_data", "--params", str(params)], cwd=tmp_path,
                          env=_env_with(standin, tmp_path / "cache"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].startswith("error: the llama.cpp runtime died with SIGSEGV")
    assert not (tmp_path / "artifacts").exists() and not (tmp_path / "outputs").exists()


def test_the_real_runtime_passes_the_smoke_check():
    text = llama_cpp.smoke_check()
    assert sum(ch.isalpha() for ch in text) >= 2
    assert shutil.which("objdump")
