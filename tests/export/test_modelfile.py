"""Modelfile text and the create payload describe the same served model."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from export.chat_format import CHATML
from export.modelfile import ServedModel

CHAT = replace(CHATML, default_system="Be helpful.")
SERVED = ServedModel(name="pure_grit_model", variant="pure_grit", base_gguf=Path("/models/base.gguf"), chat=CHAT,
                     adapter_gguf=Path("/x/adapter.gguf"), merged_gguf=Path("/x/merged.gguf"),
                     parameters={"temperature": 0.0, "seed": 0})


def test_adapter_modelfile():
    text = SERVED.modelfile("adapter")
    assert "FROM /models/base.gguf\nADAPTER /x/adapter.gguf\n" in text
    assert f'TEMPLATE """{CHATML.ollama_template}"""' in text and 'SYSTEM """Be helpful."""' in text
    assert 'PARAMETER stop "<|im_end|>"' in text and "PARAMETER temperature 0.0" in text


def test_merged_modelfile_has_no_adapter():
    text = SERVED.modelfile("merged")
    assert "FROM /x/merged.gguf" in text and "ADAPTER" not in text


def test_create_payload_matches_the_modelfile():
    digests = {Path("/models/base.gguf"): "sha256:" + "a" * 64, Path("/x/adapter.gguf"): "sha256:" + "b" * 64,
               Path("/x/merged.gguf"): "sha256:" + "c" * 64}
    payload = SERVED.create_payload(digests, "adapter")
    assert payload["files"] == {"base.gguf": "sha256:" + "a" * 64}
    assert payload["adapters"] == {"adapter.gguf": "sha256:" + "b" * 64}
    assert payload["template"] == CHATML.ollama_template and payload["system"] == "Be helpful."
    assert payload["parameters"] == {"stop": list(CHATML.stops), "temperature": 0.0, "seed": 0}
    merged = SERVED.create_payload(digests, "merged")
    assert merged["files"] == {"merged.gguf": "sha256:" + "c" * 64} and "adapters" not in merged
    assert SERVED.create_command(Path("/x/Modelfile")) == "ollama create pure_grit_model -f /x/Modelfile"
