"""Layer selection: every strategy on a 6-block Llama, caps, and 'matched nothing' is an error."""

from __future__ import annotations

import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from pipelines.params import ParamsError, parse_params
from trainers.grit.layer_selection import (
    LayerSelection,
    LayerSelectionError,
    block_index,
    select_target_modules,
)


@pytest.fixture(scope="module")
def model():
    return LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=6,
                                        num_attention_heads=2, num_key_value_heads=1))


def blocks(names):
    return sorted({block_index(n) for n in names})


@pytest.mark.parametrize(("selection", "expected"), [
    (LayerSelection(), [0, 1, 2, 3, 4, 5]),
    (LayerSelection(strategy="first_n", n_layers=2), [0, 1]),
    (LayerSelection(strategy="last_n", n_layers=2), [4, 5]),
    (LayerSelection(strategy="every_nth", step_size=2), [0, 2, 4]),
    (LayerSelection(strategy="specific", indices=[1, 4]), [1, 4]),
    (LayerSelection(strategy="skip_first_last"), [1, 2, 3, 4]),
    (LayerSelection(strategy="every_nth", step_size=1, max_layers=3), [0, 1, 2]),
])
def test_strategies_pick_the_documented_blocks(model, selection, expected):
    chosen = select_target_modules(model, ["q_proj", "v_proj"], selection)
    assert blocks(chosen) == expected
    assert {n.rsplit(".", 1)[-1] for n in chosen} == {"q_proj", "v_proj"}
    assert len(chosen) == 2 * len(expected)


def test_globs_and_errors(model):
    mlp = select_target_modules(model, ["*.layers.*.mlp.*"], LayerSelection(strategy="last_n", n_layers=1))
    assert sorted(n.rsplit(".", 1)[-1] for n in mlp) == ["down_proj", "gate_proj", "up_proj"]
    with pytest.raises(LayerSelectionError, match="match 0 linear layers; candidates end in"):
        select_target_modules(model, ["qkv"], LayerSelection())
    with pytest.raises(LayerSelectionError, match=r"indices \[9\] do not exist"):
        select_target_modules(model, ["q_proj"], LayerSelection(strategy="specific", indices=[9]))


def test_params_reject_incomplete_strategies():
    with pytest.raises(ParamsError, match="lora.layers: strategy 'first_n' needs n_layers"):
        parse_params({"lora": {"layers": {"strategy": "first_n"}}}, "params.yaml")
    with pytest.raises(ParamsError, match="grit: budget_schedule 'linear' needs budget_start"):
        parse_params({"grit": {"budget_schedule": "linear"}}, "params.yaml")
