"""The converters come from the same llama-cpp-python release as the runtime, and they agree."""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
import torch

from export.llama_cpp import LLAMA_CPP_PYTHON_VERSION, LlamaCppSetupError, converter, converters_dir
from trainers.base_model import load_causal_lm, load_tokenizer, resolve_base_model
from trainers.config import ModelParams


def test_runtime_matches_the_pinned_converters():
    assert version("llama_cpp_python") == LLAMA_CPP_PYTHON_VERSION
    for name in ("lora", "hf"):
        command = converter(name)
        assert Path(command.argv[1]).is_file()
        assert command.env["PYTHONPATH"].split(":")[0] == str(converters_dir() / "gguf-py")
        assert command.run("--help").returncode == 0


def test_missing_converters_give_a_setup_hint(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("GRIT_CACHE_DIR", str(tmp_path))
    with pytest.raises(LlamaCppSetupError, match="make setup"):
        converter("lora")


def test_hf_converter_output_runs_in_llama_cpp_with_matching_logits(tmp_path: Path):
    from llama_cpp import Llama

    params = ModelParams(source="tiny")
    files = resolve_base_model(params)
    out = tmp_path / "tiny-f32.gguf"
    result = converter("hf").run(files.hf_dir, "--outfile", out, "--outtype", "f32", check=False)
    assert result.returncode == 0, result.stderr[-2000:]

    tokenizer = load_tokenizer(files, params)
    ids = tokenizer("The capital of France is").input_ids
    with torch.no_grad():
        expected = load_causal_lm(files, params)(torch.tensor([ids])).logits[0, -1].numpy()
    llm = Llama(model_path=str(out), n_ctx=64, logits_all=True, verbose=False)
    llm.eval(ids)
    actual = np.asarray(llm.scores[len(ids) - 1])
    assert int(actual.argmax()) == int(expected.argmax())
    np.testing.assert_allclose(actual, expected, atol=1e-3)
