"""Third-party import noise known to be harmless, silenced where a stage starts.

Importing PEFT or Unsloth pulls in torchao and bitsandbytes, whose loggers print warnings about
optional kernels this project never uses before any line of the stage's own output. Each logger
below is lowered to errors only, with the reason it is harmless; anything else they or other
libraries say still shows. ``docs/setup.md`` lists them too.
"""

from __future__ import annotations

import logging

KNOWN_HARMLESS = {
    "torchao": "its optional CUDA kernels (_C_mxfp8, _C_cutlass_90a) cannot load into a CPU-only "
               "torch; no stage calls them",
    "bitsandbytes.backends.cpu.ops": "its optional CPU 4-bit kernel comes from the `kernels` hub package, "
                                     "which is not installed; 4-bit loading is CUDA-only here",
    "torch.utils._pytree": "torchao registers two Enum types the old way: a deprecation notice to torchao",
}


def silence_known_import_noise() -> None:
    for name in KNOWN_HARMLESS:
        logging.getLogger(name).setLevel(logging.ERROR)
