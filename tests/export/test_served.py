"""The serve stage's typed record (``export.served``) and the one rule for the form served."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from export.config import served_form
from export.served import ServeManifest


def test_the_one_rule_for_the_served_form():
    assert served_form("merged", adapter=True, merged=True) == "merged"
    assert served_form("merged", adapter=True, merged=False) == "adapter"      # no merged GGUF exported
    assert served_form("adapter", adapter=True, merged=True) == "adapter"
    assert served_form("merged", adapter=False, merged=False) == "base"


def _manifest(tmp_path: Path, weights: str | None = "merged") -> dict:
    folder = tmp_path / "export/v"
    folder.mkdir(parents=True)
    (folder / "export.json").write_text(json.dumps({"parity": {
        "adapter": {"agreement": 0.99, "mean_kl": 0.001}, "merged": {"agreement": 0.97, "mean_kl": 0.009}}}))
    chat = {"chat_family": "chatml", "system": None, "stops": ["<|im_end|>"]}
    v = {**chat, "ollama_name": "v_model", "base_gguf": "base.gguf", "adapter_gguf": str(folder / "adapter.gguf"),
         "merged_gguf": str(folder / "merged.gguf"), "modelfile": str(folder / "Modelfile.merged"),
         "parameters": {"seed": 0, "temperature": 0.7}, "aliases": ["grit_model"], "llama_cpp_check": {}}
    if weights is not None:
        v["weights"] = weights
    base = {**chat, "ollama_name": "base_model", "base_gguf": "base.gguf", "adapter_gguf": None, "merged_gguf": None,
            "modelfile": "serve/base/Modelfile", "parameters": {}, "aliases": [], "weights": "base",
            "llama_cpp_check": {}}
    return {"backend": "llama.cpp", "weights": "merged", "ollama": {"registered": False},
            "models": {"base": base, "v": v}, "speed_reference": None,
            "not_served": {"peft_dora": "DoRA adapters cannot be served"}}


def test_the_record_round_trips_as_the_json_serve_always_wrote(tmp_path: Path):
    raw = _manifest(tmp_path)
    manifest = ServeManifest.model_validate(raw)
    manifest.write(tmp_path / "manifest.json")
    assert json.loads((tmp_path / "manifest.json").read_text()) == raw
    assert ServeManifest.read(tmp_path / "manifest.json") == manifest


def test_the_form_served_and_its_parity_come_from_the_record(tmp_path: Path):
    manifest = ServeManifest.model_validate(_manifest(tmp_path))
    assert manifest.form("v") == "merged" and manifest.form("base") == "base"
    assert manifest.served_files("v") == (tmp_path / "export/v/merged.gguf", None)
    assert manifest.served_files("base") == (Path("base.gguf"), None)
    assert manifest.export_parity("v") == {"agreement": 0.97, "mean_kl": 0.009}
    assert manifest.export_parity("base") is None
    # what an Ollama server that refuses adapters holds, or what serve.weights adapter serves
    adapter = ServeManifest.model_validate(_manifest(tmp_path / "a", weights="adapter"))
    assert adapter.served_files("v") == (Path("base.gguf"), tmp_path / "a/export/v/adapter.gguf")
    assert adapter.export_parity("v") == {"agreement": 0.99, "mean_kl": 0.001}


def test_an_older_record_without_a_form_per_model_follows_the_one_rule(tmp_path: Path):
    older = ServeManifest.model_validate(_manifest(tmp_path, weights=None))
    assert older.form("v") == "merged"
    raw = _manifest(tmp_path / "b", weights=None)
    raw["models"]["v"]["merged_gguf"] = None
    assert ServeManifest.model_validate(raw).form("v") == "adapter"


def test_a_record_with_an_unknown_field_is_refused(tmp_path: Path):
    raw = _manifest(tmp_path)
    raw["models"]["v"]["weigths"] = "merged"
    with pytest.raises(ValidationError):
        ServeManifest.model_validate(raw)
