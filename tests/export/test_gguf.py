"""GGUF building blocks on the tiny model: quantisation, the tokenizer transplant, and merging."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from export.backend import LlamaCppModel
from export.gguf import QUANTIZATIONS, GgufExportError, quantize
from export.gguf_edit import lora_deltas
from trainers.base_model import embedded_gguf_path

PROMPTS = ["Hello there, how are you?", "Name three colours.", "What is 2 + 2?"]


def logits(served, model_file, adapter=None) -> list[np.ndarray]:
    llm = LlamaCppModel(model_file, served.chat, adapter, n_ctx=256)
    out = [llm.next_token_logits(p) for p in PROMPTS]
    llm.close()
    return out


def test_merged_gguf_computes_base_plus_adapter(tiny_export):
    # llama.cpp applying the adapter at run time and the merged F32 file must agree: the merge
    # read names, the Q/K permutation and the scale from the adapter GGUF itself.
    with_adapter = logits(tiny_export, tiny_export.base_gguf, tiny_export.adapter_gguf)
    merged = logits(tiny_export, tiny_export.merged_gguf)
    base = logits(tiny_export, tiny_export.base_gguf)
    for a, m, b in zip(with_adapter, merged, base, strict=True):
        np.testing.assert_allclose(m, a, atol=2e-3)
        assert np.abs(a - b).max() > 50 * 2e-3     # the adapter does change the logits
    assert len(lora_deltas(tiny_export.adapter_gguf)) == 2 * 7


def test_converted_tiny_model_carries_the_original_tokenizer(tiny_export):
    tokens = lambda path: gguf.GGUFReader(path).fields["tokenizer.ggml.model"].contents()  # noqa: E731
    assert tokens(tiny_export.base_gguf) == tokens(embedded_gguf_path()) == "gpt2"
    llm = LlamaCppModel(tiny_export.base_gguf, tiny_export.chat, n_ctx=256)
    assert len(llm.prompt_tokens("Hello\nthere")) > 5            # newlines and specials tokenize
    llm.close()


def test_quantize_with_llama_cpp(tiny_export, tmp_path):
    q8 = quantize(tiny_export.base_gguf, tmp_path / "q8.gguf", "Q8_0")
    reader = gguf.GGUFReader(q8)
    assert reader.fields["general.file_type"].contents() == QUANTIZATIONS["Q8_0"]
    assert any(t.tensor_type == gguf.GGMLQuantizationType.Q8_0 for t in reader.tensors)
    full, eight = logits(tiny_export, tiny_export.base_gguf), logits(tiny_export, q8)
    for f, e in zip(full, eight, strict=True):
        np.testing.assert_allclose(e, f, atol=5e-2)
    with pytest.raises(GgufExportError, match="unknown quantization"):
        quantize(tiny_export.base_gguf, tmp_path / "x.gguf", "Q3_XYZ")


def test_prompts_sharing_a_prefix_reuse_its_cache_and_compute_the_same(tiny_export):
    """The chat format's system block is evaluated once and kept (as Ollama's prompt cache
    does): later prompts evaluate only what follows it, with the logits and greedy replies of
    whole-prompt evaluation."""
    cached = LlamaCppModel(tiny_export.base_gguf, tiny_export.chat, tiny_export.adapter_gguf, n_ctx=256)
    whole = LlamaCppModel(tiny_export.base_gguf, tiny_export.chat, tiny_export.adapter_gguf, n_ctx=256,
                          prompt_cache=False)
    evaluated: list[int] = []
    evaluate = cached.llm.eval
    cached.llm.eval = lambda tokens: (evaluated.append(len(tokens)), evaluate(tokens))[1]
    for prompt in PROMPTS:
        np.testing.assert_allclose(cached.next_token_logits(prompt), whole.next_token_logits(prompt), atol=1e-4)
    lengths = [len(cached.prompt_tokens(p)) for p in PROMPTS]
    assert evaluated[0] == lengths[0]
    assert all(0 < n < length for n, length in zip(evaluated[1:], lengths[1:], strict=True)), (evaluated, lengths)
    for prompt in (PROMPTS[1], PROMPTS[1], PROMPTS[0]):   # after a generation, and the very same prompt again
        assert cached.generate(prompt, 6).text == whole.generate(prompt, 6).text
    cached.close()
    whole.close()
