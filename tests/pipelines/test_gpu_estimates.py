"""The Llama-3-8B profile's estimates (``pipelines.gpu_check.estimates``, rendered into docs/gpu.md)
rest on the right shapes, formats and profile settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.gpu_check.estimates import (
    GPU_LLAMA3_8B,
    LLAMA_3_8B,
    NF4_BITS,
    Q4_1_BITS,
    Q8_0_BITS,
    LlamaShape,
    memory,
)
from pipelines.params import load_params
from pipelines.profile import main as compose


def test_the_shape_gives_llama_3_8b_its_published_size():
    assert round(LLAMA_3_8B.parameters() / 1e9, 2) == 8.03          # Meta's model card: 8.03 B
    assert LLAMA_3_8B.kv_width == 1024 and LLAMA_3_8B.hidden // LLAMA_3_8B.heads == 128
    assert round(LLAMA_3_8B.lora_weights(16) / 1e6, 1) == 41.9


def test_the_storage_formats_cost_what_their_blocks_hold():
    assert Q8_0_BITS == 8.5 and Q4_1_BITS == 5.0                     # 32 weights + fp16 scale (+ fp16 min)
    assert NF4_BITS == pytest.approx(4.127, abs=5e-4)                # 4 bits + double-quantised absmax


def test_the_settings_are_the_composed_gpu_llama3_8b_profile(tmp_path: Path):
    assert compose(["gpu_llama3_8b", "--output", str(tmp_path / "params.yaml")]) == 0
    params = load_params(tmp_path / "params.yaml")
    assert (params.lora.r, params.train.per_device_batch_size, params.data.max_seq_length, len(params.variants)) == \
        (GPU_LLAMA3_8B.r, GPU_LLAMA3_8B.micro_batch, GPU_LLAMA3_8B.sequence, GPU_LLAMA3_8B.variants)
    assert params.model.load_in_4bit and params.model.dtype == "bfloat16"
    assert not params.train.gradient_checkpointing          # every block's activations are kept
    assert set(params.lora.target_modules) == set(LLAMA_3_8B.projections())


def test_training_in_all_is_the_sum_of_its_rows():
    rows = {e.where: e for e in memory(LLAMA_3_8B, GPU_LLAMA3_8B)}
    parts = [rows[k] for k in ("GPU: NF4 weights", "GPU: adapter, its gradient and AdamW's two moments",
                               "GPU: activations of one micro-batch", "GPU: logits and the loss")]
    total = rows["GPU: training in all"]
    assert total.low == pytest.approx(sum(p.low for p in parts) + 1.0)
    assert total.high == pytest.approx(sum(p.high for p in parts) + 2.0)
    assert all(e.low <= e.high for e in rows.values())


def test_the_gpu_checks_8b_layer_shape_is_llama_3_8bs_blocks():
    """The overhead item's ``llama-8b-layers`` model has the 8B profile's modules, only fewer blocks."""
    from pipelines.gpu_check.sizing import OVERHEAD_SHAPES, OVERHEAD_SIZES

    shape = OVERHEAD_SHAPES["llama-8b-layers"]
    built = LlamaShape("8b-layers", shape["num_hidden_layers"], shape["hidden_size"], shape["intermediate_size"],
                       shape["num_attention_heads"], shape["num_key_value_heads"], LLAMA_3_8B.vocab)
    assert built.projections() == LLAMA_3_8B.projections() and built.blocks < LLAMA_3_8B.blocks
    assert OVERHEAD_SIZES["llama-8b-layers"] == (4, 2048)
