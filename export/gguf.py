"""Base and merged GGUF files, converted and quantised with the pinned llama.cpp.

- base: the embedded default serves the package's own Q4_1 file (the adapter was trained on
  exactly its de-quantized weights); other sources go through ``convert_hf_to_gguf.py`` to F32
  (cached in ``$GRIT_CACHE_DIR/gguf`` by content) and llama.cpp's quantiser;
- merged: the adapter merged at full precision into the F32 weights (the F32 conversion, or the
  de-quantized package file), then quantised once (``gguf_edit.merge_lora``). Ollama releases
  that refuse adapters get this file, and it serves without the adapter's per-token overhead;
- the base in the merged files' format (``in_format``): the reference their served speed is
  measured against.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from core.errors import UserError
from core.files import cache_dir
from export.gguf_edit import dequantized, merge_lora, with_tokenizer_of
from export.llama_cpp import converter

# Names accepted by ``export.quantization`` -> llama.cpp's LLAMA_FTYPE_* constants.
QUANTIZATIONS = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9,
                 "Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18}


class GgufExportError(UserError):
    pass


def quantize(source: Path, target: Path, quantization: str) -> Path:
    """llama.cpp's own quantiser (llama_model_quantize), written atomically; F32 is a copy."""
    import shutil

    import llama_cpp

    if quantization not in QUANTIZATIONS:
        raise GgufExportError(f"unknown quantization {quantization!r}; choose from {', '.join(QUANTIZATIONS)}")
    # one partial file per process: two processes filling the same cache entry never share one
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    if quantization == "F32":
        shutil.copyfile(source, partial)
    else:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = QUANTIZATIONS[quantization]
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), params)
        if status != 0 or not partial.is_file():
            raise GgufExportError(f"llama.cpp could not quantize {source} to {quantization} (status {status})")
    partial.replace(target)
    return target


def file_type(gguf_file: Path) -> str | None:
    """The quantization a GGUF file declares (``general.file_type``), as ``QUANTIZATIONS`` names
    it; None for a type not listed there."""
    import gguf

    field = gguf.GGUFReader(gguf_file).fields.get(gguf.Keys.General.FILE_TYPE)
    code = None if field is None else int(field.contents())
    return next((name for name, value in QUANTIZATIONS.items() if value == code), None)


def in_format(base: Path, base_sha256: str, quantization: str) -> Path:
    """``base`` in the format merged variants are served in: de-quantized to F32 and quantised
    to ``quantization`` once, as ``merged_gguf`` writes a merge. It differs from a merged variant
    in the adapter's values only, so timing the two side by side measures the adapter, not the
    file format (a Q8_0 file decodes slower than a Q4_1 one on a memory-bound CPU). Cached in
    ``$GRIT_CACHE_DIR/gguf`` by the base's sha256."""
    if quantization not in QUANTIZATIONS:
        raise GgufExportError(f"unknown quantization {quantization!r}; choose from {', '.join(QUANTIZATIONS)}")
    target = cache_dir() / "gguf" / f"{base.stem}-{base_sha256[:16]}-as-{quantization}.gguf"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".dequantize-") as scratch:
        return quantize(dequantized(base, Path(scratch) / "f32.gguf"), target, quantization)


def _content_key(hf_dir: Path) -> str:
    digest = hashlib.sha256((hf_dir / "config.json").read_bytes())
    for weights in sorted(hf_dir.glob("*.safetensors")) or sorted(hf_dir.glob("*.bin")):
        digest.update(f"{weights.name}:{weights.stat().st_size}:{weights.stat().st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def full_precision_gguf(files) -> Path:
    """The F32 GGUF the merges start from: the package file (de-quantized on read) for the
    embedded model, else a cached ``convert_hf_to_gguf.py`` conversion of the HF directory."""
    if files.source == "embedded" and files.gguf_path is not None:
        return Path(files.gguf_path)
    target = cache_dir() / "gguf" / f"{files.hf_dir.name}-{_content_key(files.hf_dir)}-F32.gguf"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".convert-") as scratch:
        converted = Path(scratch) / "model-f32.gguf"
        result = converter("hf").run(files.hf_dir, "--outfile", converted, "--outtype", "f32", check=False)
        if result.returncode != 0 or not converted.is_file():
            tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
            raise GgufExportError(f"convert_hf_to_gguf.py failed on {files.hf_dir}: {tail[0]}")
        if files.source == "tiny":
            # The tiny model carries SmolLM2's tokenizer: take its original GGUF tokenizer fields.
            from trainers.base_model import embedded_gguf_path

            converted = with_tokenizer_of(converted, embedded_gguf_path(), Path(scratch) / "model-tok.gguf")
        converted.replace(target)
    return target


def base_gguf(files, quantization: str) -> Path:
    """The GGUF the base model is served from (Modelfile ``FROM``)."""
    if files.source == "embedded" and files.gguf_path is not None:
        return Path(files.gguf_path)
    f32 = full_precision_gguf(files)
    if quantization == "F32":
        return f32
    target = f32.with_name(f32.name.replace("-F32.gguf", f"-{quantization}.gguf"))
    return target if target.is_file() else quantize(f32, target, quantization)


def merged_gguf(files, adapter_gguf: Path, target: Path, quantization: str) -> Path:
    """The adapter merged into the full-precision base, quantised to ``quantization``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".merge-") as scratch:
        merged = merge_lora(full_precision_gguf(files), adapter_gguf, Path(scratch) / "merged-f32.gguf")
        return quantize(merged, target, quantization)
