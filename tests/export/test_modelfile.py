"""Modelfile text and the create payload describe the same served model."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from export.chat_format import CHATML
from export.decoding import GREEDY, llama_cpp_sampling
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
    assert payload["parameters"] == {"stop": list(CHATML.stops), "seed": 0, **GREEDY}
    merged = SERVED.create_payload(digests, "merged")
    assert merged["files"] == {"merged.gguf": "sha256:" + "c" * 64} and "adapters" not in merged
    assert SERVED.create_command(Path("/x/Modelfile")) == "ollama create pure_grit_model -f /x/Modelfile"


def test_the_modelfile_states_the_greedy_decoding_the_evaluation_uses():
    """Ollama's defaults (repeat_penalty 1.1, temperature 0.8, top_k 40) would answer otherwise
    than the llama.cpp replies the evaluation measured; the export's temperature cannot override."""
    text = SERVED.modelfile("merged")
    for key, value in GREEDY.items():
        assert text.count(f"PARAMETER {key} ") == 1 and f"PARAMETER {key} {value}\n" in text
    assert "PARAMETER repeat_penalty 1.0\n" in text and "PARAMETER seed 0\n" in text
    hot = replace(SERVED, parameters={"temperature": 0.7})
    assert "PARAMETER temperature 0.0\n" in hot.modelfile() and hot.options["temperature"] == 0.0
    sampling = llama_cpp_sampling()                 # the same options, as llama.cpp's generate takes them
    assert sampling["temp"] == GREEDY["temperature"] and sampling["repeat_penalty"] == GREEDY["repeat_penalty"]
    assert {k for k in sampling if k != "temp"} == set(GREEDY) - {"temperature"}
