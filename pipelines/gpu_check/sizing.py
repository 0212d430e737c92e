"""How the GPU check's ``overhead`` and ``profile`` items size and set up their arms: the model
shapes they build, and :class:`Sizing`, what the command line says of the batch, the timed
steps and the arms' settings. No torch here: the orchestrator (``cli.py``) reads it too."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from typing import Any

from pipelines.gpu_check.estimates import LLAMA_3_8B

# The overhead item's model shapes: SmolLM2-135M's (a GPU step bound by the host) and
SMOLLM2_SHAPE = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                 "num_key_value_heads": 3}
# a 1B-class Llama (Llama-3.2-1B's blocks, a step bound by compute).
LLAMA_1B_SHAPE = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
                  "num_key_value_heads": 8, "max_position_embeddings": 4096}
# Llama-3-8B's blocks (the 8B profile's layer shapes), four of them: each GRIT and LoRA module at
# the size the 8B profile trains, in a model that fits any card.
LLAMA_8B_LAYERS_SHAPE = {"hidden_size": LLAMA_3_8B.hidden, "intermediate_size": LLAMA_3_8B.mlp, "num_hidden_layers": 4,
                         "num_attention_heads": LLAMA_3_8B.heads, "num_key_value_heads": LLAMA_3_8B.kv_heads,
                         "max_position_embeddings": 4096}
OVERHEAD_SHAPES = {"smollm2": SMOLLM2_SHAPE, "llama-1b": LLAMA_1B_SHAPE, "llama-8b-layers": LLAMA_8B_LAYERS_SHAPE}
# (batch, length) a shape is timed at whatever the command line says: the larger shapes at 8k tokens
OVERHEAD_SIZES = {"llama-1b": (4, 2048), "llama-8b-layers": (4, 2048)}
# lora.adapter_dtype of both arms: PEFT's fp32 adapters, or the model's dtype (bf16 on a GPU)
ADAPTER_DTYPES = ("float32", "model")
# grit.capture of the GRIT arm: the engine's (fused on Unsloth, hooks on PEFT), or either on both
GRIT_CAPTURES = ("auto", "hooks", "fused")
# The LoRA arm's forward and backward: the engine's own, or GRIT's fused functions without GRIT
# (PEFT only), so that a GRIT arm through those functions is timed against the same arithmetic.
LORA_FUNCTIONS = ("engine", "fused")
# The base both arms train on: the model's dtype (bf16 on a GPU), or NF4 through bitsandbytes, where
# the hybrid's GRIT runs its fused functions over the packed 4-bit weights (de-quantised per product,
# as Unsloth's 4-bit kernels do) against Unsloth's own 4-bit LoRA. CUDA only.
BASES = ("model", "nf4")


@dataclass(frozen=True)
class Sizing:
    """How the overhead and profile items size and set up their arms: timed steps per arm, the
    batch (rows x tokens), ``lora.adapter_dtype`` of both arms, ``grit.capture`` of GRIT's and the
    LoRA arm's functions (``lora_functions``), and the base both arms train on (``base``).
    One value from the command line (both the check's and an item's) to the model an item
    builds, in place of five arguments passed on by hand through every signature between."""

    steps: int = 10
    batch: int = 8
    length: int = 256
    adapter_dtype: str = "float32"
    grit_capture: str = "auto"
    lora_functions: str = "engine"
    base: str = "model"

    def for_shape(self, shape: str) -> Sizing:
        """This sizing at ``shape``: its own batch where it has one (``OVERHEAD_SIZES``: the 1B
        and 8B-layer shapes at 8k tokens), the command line's otherwise."""
        if shape not in OVERHEAD_SHAPES:
            raise ValueError(f"unknown shape {shape!r}; choose from {', '.join(OVERHEAD_SHAPES)}")
        batch, length = OVERHEAD_SIZES.get(shape, (self.batch, self.length))
        return replace(self, batch=batch, length=length)

    def for_engine(self, engine: str) -> Sizing:
        """This sizing on ``engine``: the LoRA arm's functions are Unsloth's own fused kernels on
        Unsloth's, whatever ``lora_functions`` asks (it chooses between PEFT's forward and GRIT's
        fused functions on PEFT's), so a check run over both engines records what each ran."""
        return self if engine == "peft" else replace(self, lora_functions="engine")

    def refusal(self, device: str) -> str | None:
        """Why this sizing cannot run on ``device`` (None: it can); one rule for the check's
        command line and an item's process run alone."""
        if self.base == "nf4" and device != "cuda":
            return ("--base nf4 needs CUDA (bitsandbytes loads the NF4 base onto the GPU); "
                    "a cpu rehearsal runs --base model")
        return None

    def argv(self) -> list[str]:
        """The options that give an item's process this sizing (:meth:`add_arguments`)."""
        return ["--steps", str(self.steps), "--batch", str(self.batch), "--length", str(self.length),
                "--adapter-dtype", self.adapter_dtype, "--grit-capture", self.grit_capture,
                "--lora-functions", self.lora_functions, "--base", self.base]

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        default = Sizing()
        parser.add_argument("--steps", type=int, default=default.steps, help="timed steps per arm in the overhead item")
        parser.add_argument("--batch", type=int, default=default.batch)
        parser.add_argument("--length", type=int, default=default.length)
        parser.add_argument("--adapter-dtype", choices=ADAPTER_DTYPES, default=default.adapter_dtype,
                            help="lora.adapter_dtype of both arms in the overhead and profile items (model: bf16 "
                                 "adapters)")
        parser.add_argument("--grit-capture", choices=GRIT_CAPTURES, default=default.grit_capture,
                            help="grit.capture of the GRIT arm in the overhead and profile items (auto: the engine's)")
        parser.add_argument("--lora-functions", choices=LORA_FUNCTIONS, default=default.lora_functions,
                            help="the LoRA arm's functions on the PEFT engine: PEFT's own (engine) or GRIT's fused "
                                 "functions without GRIT (fused), the baseline of --grit-capture fused")
        parser.add_argument("--base", choices=BASES, default=default.base,
                            help="the base both arms of the overhead and profile items train on: the model's dtype, "
                                 "or nf4 (bitsandbytes, CUDA only; GRIT's fused functions de-quantise per product)")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Sizing:
        return cls(steps=args.steps, batch=args.batch, length=args.length, adapter_dtype=args.adapter_dtype,
                   grit_capture=args.grit_capture, lora_functions=args.lora_functions, base=args.base)

    def figures(self) -> dict[str, Any]:
        """What an item's figures record of its sizing."""
        return {"adapter_dtype": self.adapter_dtype, "grit_capture": self.grit_capture,
                "lora_functions": self.lora_functions, "base": self.base, "steps": self.steps,
                "batch": self.batch, "length": self.length}


DEFAULT_SIZING = Sizing()
