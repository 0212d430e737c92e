"""The first thing a newcomer reads is the stage's own output: the known-harmless import noise of
torchao and bitsandbytes (optional kernels this project never uses) is silenced at a stage's
start, and it is there to silence (so the test would notice if it came back another way)."""

from __future__ import annotations

import subprocess
import sys

TORCHAO_NOISE = ("Failed to load", "is an Enum subclass")
# bitsandbytes looks for its optional CPU 4-bit kernel (and warns that it is missing) only on a
# CPU with AVX-512 BF16, so whether this line is printed depends on the host.
BITSANDBYTES_NOISE = "gemm_4bit_forward"
# Every kind of known noise: none of it may get through once silenced (other tests import this).
NOISE = TORCHAO_NOISE + (BITSANDBYTES_NOISE,)


def stderr_of_importing_peft(silenced: bool) -> str:
    code = ("from core.quiet import silence_known_import_noise; silence_known_import_noise(); " if silenced
            else "") + "import peft"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr


def host_noise() -> tuple[str, ...]:
    from bitsandbytes.functional import has_avx512bf16

    return TORCHAO_NOISE + ((BITSANDBYTES_NOISE,) if has_avx512bf16() else ())


def test_importing_peft_after_the_stage_start_prints_none_of_the_known_noise():
    noise = host_noise()
    loud = stderr_of_importing_peft(silenced=False)
    assert all(line in loud for line in noise), loud[-2000:]
    quiet = stderr_of_importing_peft(silenced=True)
    assert not any(line in quiet for line in NOISE), quiet[-2000:]
