"""Seed replicates of every variant (``train.n_seeds``), named the same way by every stage.

The primary replicate (seed ``train.seed``) keeps the plain paths and names, so a one-seed run
looks exactly like a run without replicates and ``ollama run pure_grit_model`` stays the same;
replicate seed ``s`` nests under ``seed-<s>/`` of the same folder and is served as
``<variant>_seed<s>_model``. The results store records the training seed itself in ``seed``.
"""

from __future__ import annotations

from pathlib import Path

from pipelines.params import Params, capabilities


def replicates(params: Params) -> list[tuple[str, int]]:
    """(variant, seed) of every trained model of a run, variant by variant, primary seed first."""
    return [(variant, seed) for variant in params.variants for seed in params.train.seeds]


def served_replicates(params: Params) -> list[tuple[str, int]]:
    """The replicates export@ and serve turn into served models: those of every variant whose LoRA
    settings can be served (``pipelines.params.capabilities``); the others are measured in fp32."""
    return [(variant, seed) for variant, seed in replicates(params) if capabilities(params, variant).servable]


def replicate_path(folder: Path, params: Params, seed: int) -> Path:
    return folder if seed == params.train.seed else folder / f"seed-{seed}"


def model_key(variant: str, params: Params, seed: int) -> str:
    """How evaluation and serving name one replicate of one variant (``base`` has none)."""
    return variant if seed == params.train.seed else f"{variant}_seed{seed}"


def with_seed(params: Params, seed: int) -> Params:
    """The params a replicate trains with: everything equal but the training seed."""
    return params.model_copy(update={"train": params.train.model_copy(update={"seed": seed})})
