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


def tensor_layout(path) -> list[tuple[str, int, tuple[int, ...]]]:
    return [(t.name, int(t.tensor_type), tuple(int(n) for n in t.shape)) for t in gguf.GGUFReader(path).tensors]


def test_the_base_in_the_merged_format_differs_from_a_merge_in_the_adapter_only(tiny_export, tmp_path,
                                                                                 monkeypatch):
    """The speed reference: a Q4_1 base re-encoded in Q8_0 has a Q8_0 merge's tensors, types and
    shapes (so timing them side by side leaves only the adapter), computes the base, is cached by
    the base's digest, and the serve stage names it only when the formats differ."""
    from core.files import sha256_file
    from export.gguf import file_type, in_format, merged_gguf
    from pipelines.serve import speed_reference
    from trainers.base_model import resolve_base_model
    from trainers.config import ModelParams

    q4 = quantize(tiny_export.base_gguf, tmp_path / "base-q4.gguf", "Q4_1")
    merged = merged_gguf(resolve_base_model(ModelParams(source="tiny")), tiny_export.adapter_gguf,
                         tmp_path / "merged-q8.gguf", "Q8_0")
    monkeypatch.setenv("GRIT_CACHE_DIR", str(tmp_path / "cache"))      # a cache of its own: written here
    reference = in_format(q4, sha256_file(q4), "Q8_0")
    assert (file_type(q4), file_type(merged), file_type(reference)) == ("Q4_1", "Q8_0", "Q8_0")
    assert tensor_layout(reference) == tensor_layout(merged) != tensor_layout(q4)
    for base, again in zip(logits(tiny_export, q4), logits(tiny_export, reference), strict=True):
        np.testing.assert_allclose(again, base, atol=5e-2)
    written = reference.stat().st_mtime_ns
    assert in_format(q4, sha256_file(q4), "Q8_0") == reference and reference.stat().st_mtime_ns == written
    with pytest.raises(GgufExportError, match="unknown quantization"):
        in_format(q4, sha256_file(q4), "Q3_XYZ")

    assert speed_reference(q4, [merged]).model_dump() == {"gguf": reference, "quantization": "Q8_0"}
    assert speed_reference(q4, []) is None                         # nothing served merged
    assert speed_reference(reference, [merged]) is None            # the base is in their format already
