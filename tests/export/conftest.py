"""A tiny exported model: base GGUF, adapter GGUF and merged GGUF of the tiny Llama."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from export.adapter import convert_adapter, folded_adapter
from export.chat_format import chat_format
from export.gguf import base_gguf, merged_gguf
from export.modelfile import ServedModel
from trainers.base_model import load_causal_lm, load_tokenizer, resolve_base_model
from trainers.config import ModelParams

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="session")
def tiny_peft():
    """The tiny Llama with a LoRA adapter whose B is drawn at random, so the adapter matters."""
    params = ModelParams(source="tiny")
    torch.manual_seed(0)
    model = get_peft_model(load_causal_lm(resolve_base_model(params), params),
                           LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.05)
    return model


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory, tiny_peft) -> ServedModel:
    folder = tmp_path_factory.mktemp("tiny-export")
    params = ModelParams(source="tiny")
    files = resolve_base_model(params)
    tiny_peft.save_pretrained(folder / "adapter")
    adapter = convert_adapter(folded_adapter(folder / "adapter", folder / "folded"), files.hf_dir,
                              folder / "adapter.gguf")
    merged = merged_gguf(files, adapter, folder / "merged.gguf", "F32")
    return ServedModel(name="tiny_model", variant="tiny", base_gguf=base_gguf(files, "F32"),
                       chat=chat_format(load_tokenizer(files, params)), adapter_gguf=adapter, merged_gguf=merged,
                       parameters={"temperature": 0.0, "seed": 0, "num_predict": 8})


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """The REAL Ollama server of ``make setup``'s build, on a free loopback port with a temporary
    model store, for the session."""
    from export.ollama_build import installed_binary
    from export.ollama_server import start_server, stop_server

    folder = tmp_path_factory.mktemp("ollama")
    started = start_server(installed_binary(), folder / "models", folder / "server.log")
    yield started
    stop_server(started.pid)
