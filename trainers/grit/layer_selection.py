"""Which linear layers get LoRA: glob patterns plus a layer-selection strategy (GRIT-VLM guide).

Patterns are matched against module names with ``fnmatch`` (``*.layers.*.self_attn.q_proj``); a
bare name such as ``q_proj`` means "any module whose last component is q_proj". Strategies pick
*transformer block indices* (the number after ``layers.``) among the matching modules:

    all, first_n (n_layers), last_n (n_layers), every_nth (step_size: 0, n, 2n, ...),
    specific (indices), skip_first_last

after dropping the last ``skip_last`` blocks (a VLM that reads its image features from the
second-to-last vision block, as LLaVA and Phi-3.5-vision do, never sends a gradient through the
last one: LoRA there would learn nothing and GRIT would capture nothing); then at most
``max_layers`` blocks are kept (the per-modality cap; the last ones for last_n). Every variant
uses the same function, so baseline, hybrid and pure GRIT adapt exactly the same modules.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field, model_validator

from core.errors import UserError
from core.section import Section

if TYPE_CHECKING:
    from torch import nn

Strategy = Literal["all", "first_n", "last_n", "every_nth", "specific", "skip_first_last"]
_BLOCK_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.")


class LayerSelectionError(UserError):
    pass


class LayerSelection(Section):

    strategy: Strategy = "all"
    n_layers: Annotated[int, Field(gt=0)] | None = None
    step_size: Annotated[int, Field(gt=0)] = 2
    indices: list[Annotated[int, Field(ge=0)]] = []
    max_layers: Annotated[int, Field(gt=0)] | None = None
    skip_last: Annotated[int, Field(ge=0)] = 0

    @model_validator(mode="after")
    def _strategy_needs(self) -> LayerSelection:
        if self.strategy in ("first_n", "last_n") and self.n_layers is None:
            raise ValueError(f"strategy '{self.strategy}' needs n_layers")
        if self.strategy == "specific" and not self.indices:
            raise ValueError("strategy 'specific' needs indices")
        return self


def block_index(module_name: str) -> int | None:
    match = _BLOCK_INDEX.search(module_name)
    return int(match.group(1)) if match else None


def _matches(name: str, pattern: str) -> bool:
    if "*" in pattern or "." in pattern:
        return fnmatch.fnmatchcase(name, pattern)
    return name.rsplit(".", 1)[-1] == pattern


def candidate_linear_layers(model: nn.Module) -> list[str]:
    """Names of every nn.Linear in the model: what patterns can match (for error messages)."""
    from torch import nn

    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def select_blocks(indices: Sequence[int], selection: LayerSelection) -> list[int]:
    """Apply the strategy and the cap to sorted block indices (pure)."""
    blocks = sorted(set(indices))
    blocks = blocks[: len(blocks) - selection.skip_last]
    strategy = selection.strategy
    if strategy == "first_n":
        chosen = blocks[: selection.n_layers]
    elif strategy == "last_n":
        chosen = blocks[-selection.n_layers:]
    elif strategy == "every_nth":
        chosen = blocks[:: selection.step_size]
    elif strategy == "specific":
        missing = sorted(set(selection.indices) - set(blocks))
        if missing:
            raise LayerSelectionError(f"layer indices {missing} do not exist; "
                                      f"the model has blocks {blocks[0]}..{blocks[-1]}")
        chosen = sorted(set(selection.indices))
    elif strategy == "skip_first_last":
        chosen = blocks[1:-1]
    else:
        chosen = blocks
    if not selection.max_layers:
        return chosen
    # the cap keeps the blocks the strategy is about: the last ones for last_n, else the first
    return chosen[-selection.max_layers:] if strategy == "last_n" else chosen[: selection.max_layers]


def select_target_modules(model: nn.Module, patterns: Sequence[str], selection: LayerSelection) -> list[str]:
    """Full names of the linear modules to adapt; an empty result is an error, never a no-op."""
    candidates = candidate_linear_layers(model)
    matched = [name for name in candidates if any(_matches(name, p) for p in patterns)]
    if not matched:
        suffixes = sorted({name.rsplit(".", 1)[-1] for name in candidates})
        raise LayerSelectionError(
            f"target patterns {list(patterns)} match 0 linear layers; candidates end in {suffixes[:20]}"
        )
    indexed = [name for name in matched if block_index(name) is not None]
    if selection.strategy == "all" and ((selection.max_layers is None and not selection.skip_last) or not indexed):
        return matched  # a cap counts blocks; unnumbered modules (a VLM's connector) have none
    if not indexed:
        raise LayerSelectionError(f"strategy '{selection.strategy}' needs numbered blocks "
                                  f"(layers.N.*) in {matched[:3]}")
    keep = set(select_blocks([block_index(n) for n in indexed], selection))
    chosen = [name for name in indexed if block_index(name) in keep]
    if not chosen:
        raise LayerSelectionError(f"strategy '{selection.strategy}' selected 0 of {len(indexed)} layers")
    return chosen
