"""Base-model resolution: tiny (built from a config), local HF directory, embedded SmolLM2."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from trainers.base_model import (
    ModelSourceError,
    embedded_gguf_path,
    load_causal_lm,
    load_tokenizer,
    resolve_base_model,
)
from trainers.config import ModelParams, TinyModelParams
from trainers.hardware import HardwareError

TINY = ModelParams(source="tiny", tiny=TinyModelParams(num_hidden_layers=2, hidden_size=64))


@pytest.fixture(scope="module")
def tiny_files():
    return resolve_base_model(TINY)


def test_tiny_llama_has_requested_shape_and_real_chat_template(tiny_files):
    model = load_causal_lm(tiny_files, TINY)
    tokenizer = load_tokenizer(tiny_files, TINY)
    assert model.config.model_type == "llama"
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64
    assert model.config.vocab_size == len(tokenizer) == 49152
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert "<|im_start|>user\nhi<|im_end|>" in prompt and prompt.endswith("<|im_start|>assistant\n")
    assert tokenizer.eos_token == "<|im_end|>"
    ids = tokenizer("hello world", return_tensors="pt").input_ids
    assert model(ids).logits.shape == (1, ids.shape[1], 49152)


def test_tiny_is_cached_by_content_and_depends_on_shape(tiny_files):
    assert resolve_base_model(TINY).hf_dir == tiny_files.hf_dir
    other = resolve_base_model(ModelParams(source="tiny", tiny=TinyModelParams(seed=1)))
    assert other.hf_dir != tiny_files.hf_dir


def test_hf_source_loads_a_local_directory(tiny_files):
    params = ModelParams(source="hf", model_id=str(tiny_files.hf_dir))
    files = resolve_base_model(params)
    assert files.hf_dir == tiny_files.hf_dir and files.gguf_path is None
    reference = load_causal_lm(tiny_files, TINY).state_dict()
    loaded = load_causal_lm(files, params).state_dict()
    assert all(torch.equal(reference[k], loaded[k]) for k in reference)


def test_hf_source_errors_are_one_line(tmp_path: Path, monkeypatch):
    with pytest.raises(ModelSourceError, match="without config.json"):
        resolve_base_model(ModelParams(source="hf", model_id=str(tmp_path)))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelSourceError) as caught:
        resolve_base_model(ModelParams(source="hf", model_id="nobody/no-such-model"))
    assert "\n" not in str(caught.value) and "model.model_id" in str(caught.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal of NF4")
def test_4bit_on_cpu_is_refused_before_loading():
    with pytest.raises(HardwareError, match="load_in_4bit.*CUDA"):
        resolve_base_model(ModelParams(source="tiny", load_in_4bit=True))


@pytest.mark.slow
def test_embedded_dequantized_weights_equal_the_gguf():
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors import safe_open

    files = resolve_base_model(ModelParams())
    assert files.gguf_path == embedded_gguf_path() and files.source_sha256
    reader = GGUFReader(files.gguf_path)
    tensor = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    expected = dequantize(tensor.data, tensor.tensor_type).reshape(576, 1536)
    with safe_open(files.hf_dir / "model.safetensors", "pt") as weights:
        actual = weights.get_tensor("model.layers.0.mlp.down_proj.weight").numpy()
    np.testing.assert_array_equal(actual, expected.astype(np.float32))


@pytest.mark.slow
def test_embedded_model_knows_the_capital_of_france():
    params = ModelParams()
    files = resolve_base_model(params)
    model, tokenizer = load_causal_lm(files, params), load_tokenizer(files, params)
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_a_cache_entry_published_twice_keeps_the_first_complete_copy(tmp_path):
    """Two processes (two test workers, two stages) may build the same content-keyed entry at
    once: the second publisher drops its copy instead of swapping out one a reader may be using."""
    from trainers.base_model import _is_complete, _publish

    final = tmp_path / "models" / "entry"
    copies = []
    for n, text in enumerate(("first", "second")):
        staging = tmp_path / "models" / f".entry.tmp-{n}"
        staging.mkdir(parents=True)
        (staging / "weights").write_text(text)
        copies.append(staging)
    assert _publish(copies[0], final) == final and _is_complete(final)
    published = final.stat().st_ino
    assert _publish(copies[1], final) == final
    assert (final / "weights").read_text() == "first" and final.stat().st_ino == published
    assert not copies[1].exists()
