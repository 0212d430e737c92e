"""Editing GGUF files with gguf-py: swap metadata, and merge a GGUF LoRA into a base GGUF.

- ``merge_lora``: ``W' = W + (alpha / r) * lora_b @ lora_a`` for every tensor the adapter GGUF
  touches, read from the converted adapter itself (so the names, the Q/K row permutation and
  the folded scale are exactly what llama.cpp applies at serving time); every tensor is written
  as F32 and quantised afterwards by llama.cpp's own quantiser. Metadata (tokenizer, chat
  template, architecture) comes from the base file untouched.
- ``dequantized``: the base alone written the same way, the speed reference of merged files.
- ``with_tokenizer_of``: a converted GGUF with another GGUF's tokenizer fields (the tiny test
  model carries SmolLM2's tokenizer, whose reconstructed ``tokenizer.json`` the HF converter
  misreads; the package GGUF holds the original).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

SUPPRESSED_PREFIX = "GGUF."


def _copy_fields(reader, writer, skip: Callable[[str], bool], overrides: dict[str, object] | None = None) -> None:
    import gguf

    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith(SUPPRESSED_PREFIX) or skip(field.name):
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        value = (overrides or {}).get(field.name, field.contents())
        writer.add_key_value(field.name, value, value_type, sub_type=sub_type)


def _architecture(reader) -> str:
    import gguf

    return reader.fields[gguf.Keys.General.ARCHITECTURE].contents()


def _write(writer, tensors: list[tuple[str, np.ndarray, object]]) -> None:
    for name, data, tensor_type in tensors:
        writer.add_tensor_info(name, data.shape, data.dtype, data.nbytes, tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, data, _ in tensors:
        writer.write_tensor_data(data)
    writer.close()


def with_tokenizer_of(converted: Path, tokenizer_source: Path, out: Path) -> Path:
    """``converted`` with every ``tokenizer.*`` field replaced by those of ``tokenizer_source``."""
    import gguf

    model, source = gguf.GGUFReader(converted), gguf.GGUFReader(tokenizer_source)
    partial = out.with_name(f".{out.name}.partial")
    writer = gguf.GGUFWriter(partial, arch=_architecture(model))
    _copy_fields(model, writer, skip=lambda name: name.startswith("tokenizer."))
    _copy_fields(source, writer, skip=lambda name: not name.startswith("tokenizer."))
    _write(writer, [(t.name, t.data, t.tensor_type) for t in model.tensors])
    partial.replace(out)
    return out


def lora_deltas(adapter_gguf: Path) -> dict[str, np.ndarray]:
    """base tensor name -> (alpha / r) * lora_b @ lora_a, as llama.cpp applies it ([out, in])."""
    import gguf

    reader = gguf.GGUFReader(adapter_gguf)
    alpha = float(reader.fields["adapter.lora.alpha"].contents())
    tensors = {t.name: np.asarray(t.data, dtype=np.float32) for t in reader.tensors}
    deltas = {}
    for name, lora_a in tensors.items():
        if name.endswith(".lora_a"):
            base = name.removesuffix(".lora_a")
            lora_b = tensors[f"{base}.lora_b"]
            deltas[base] = (alpha / lora_a.shape[0]) * (lora_b.astype(np.float64) @ lora_a.astype(np.float64))
    return deltas


def merge_lora(base_gguf: Path, adapter_gguf: Path, out: Path) -> Path:
    """An all-F32 GGUF of the base with the adapter merged in (quantise it afterwards)."""
    return _f32_with(base_gguf, lora_deltas(adapter_gguf), out)


def dequantized(base_gguf: Path, out: Path) -> Path:
    """An all-F32 GGUF of the base as it is: what ``merge_lora`` writes for an adapter that
    changes nothing, so quantising both the same way gives files of one format and shape."""
    return _f32_with(base_gguf, {}, out)


def _f32_with(base_gguf: Path, deltas: dict[str, np.ndarray], out: Path) -> Path:
    """An all-F32 GGUF of the base with ``deltas`` (base tensor name -> [out, in]) added."""
    import gguf

    base = gguf.GGUFReader(base_gguf)
    names = {t.name for t in base.tensors}
    missing = sorted(set(deltas) - names)
    if missing:
        raise ValueError(f"the adapter touches {missing[0]}, which {base_gguf.name} does not have")
    tensors = []
    for tensor in base.tensors:
        weights = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        if tensor.name in deltas:
            weights = (weights.astype(np.float64) + deltas[tensor.name]).astype(np.float32)
        tensors.append((tensor.name, np.ascontiguousarray(weights), gguf.GGMLQuantizationType.F32))
    partial = out.with_name(f".{out.name}.partial")
    writer = gguf.GGUFWriter(partial, arch=_architecture(base))
    _copy_fields(base, writer, skip=lambda name: False,
                 overrides={"general.file_type": int(gguf.LlamaFileType.ALL_F32)})
    _write(writer, tensors)
    partial.replace(out)
    return out
