"""Stages ``export@<variant>`` and ``serve`` on the smoke model: GGUF files, Modelfiles, parity,
registration against the Ollama STAND-IN server, and the no-server path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from ollama_standin import OllamaStandIn
from variant_subset import keep_only

from pipelines.profile import compose_params

pytestmark = pytest.mark.slow     # runs the prepare_data, train, export and serve stages

REPO = Path(__file__).resolve().parents[2]


def run(workdir: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=workdir, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("export")
    compose_params("smoke", workdir / "params.yaml")
    raw = yaml.safe_load((workdir / "params.yaml").read_text())
    # The plan's name grit_model, on the one variant here.
    keep_only(raw, {"pure_grit": {"engine": "peft", "grit": True}}, aliases={"grit_model": "pure_grit"})
    raw["serve"]["weights"] = "adapter"      # register FROM base + ADAPTER (the default serves merged)
    (workdir / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    for stage in (["pipelines.prepare_data"], ["pipelines.train", "--variant", "pure_grit"],
                  ["pipelines.export", "--variant", "pure_grit"]):
        result = run(workdir, *stage)
        assert result.returncode == 0, (stage, result.stdout[-2000:], result.stderr[-3000:])
    return workdir


def test_export_writes_gguf_files_modelfiles_and_proven_parity(exported: Path):
    folder = exported / "artifacts/export/pure_grit"
    manifest = json.loads((folder / "export.json").read_text())
    for name in ("adapter.gguf", "merged.gguf"):
        assert (folder / name).read_bytes()[:4] == b"GGUF"
    assert manifest["chat_family"] == "chatml" and manifest["stops"][0] == "<|im_end|>"
    for form in ("adapter", "merged"):
        assert manifest["parity"][form]["agreement"] >= 0.95 and manifest["parity"][form]["mean_kl"] <= 0.02
    modelfile = (folder / "Modelfile").read_text()
    assert f"FROM {manifest['base_gguf']}" in modelfile and "ADAPTER ./adapter.gguf" in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and "TEMPLATE \"\"\"{{ range .Messages }}" in modelfile
    assert "FROM ./merged.gguf" in (folder / "Modelfile.merged").read_text()


def test_serve_registers_with_an_ollama_server(exported: Path, tmp_path: Path):
    with OllamaStandIn(tmp_path / "blobs") as server:
        result = run(exported, "pipelines.serve", env={"OLLAMA_HOST": server.url})
        assert result.returncode == 0, result.stderr[-3000:]
        assert set(server.models) == {"base_model", "pure_grit_model", "grit_model"}
        assert server.models["grit_model"] == server.models["pure_grit_model"]
        assert "[serve] grit_model: another name of pure_grit_model; ADAPTER attached" in result.stdout
    manifest = json.loads((exported / "artifacts/serve/manifest.json").read_text())
    assert manifest["backend"] == "ollama" and manifest["ollama"]["registered"]
    assert manifest["models"]["pure_grit"]["ollama"]["weights"] == "adapter"
    assert "ADAPTER attached" in manifest["models"]["pure_grit"]["ollama"]["show_check"]


def test_serve_without_a_server_records_the_commands_and_uses_llama_cpp(exported: Path):
    result = run(exported, "pipelines.serve", env={"OLLAMA_HOST": "http://127.0.0.1:9"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipped: no Ollama server at http://127.0.0.1:9" in result.stdout
    manifest = json.loads((exported / "artifacts/serve/manifest.json").read_text())
    assert manifest["backend"] == "llama.cpp" and not manifest["ollama"]["registered"]
    assert any(c.startswith("ollama create pure_grit_model -f ") for c in manifest["ollama"]["commands"])
    assert manifest["ollama"]["commands"][-1] == "ollama cp pure_grit_model grit_model"
    assert manifest["models"]["pure_grit"]["aliases"] == ["grit_model"]
    checks = manifest["models"]["pure_grit"]["llama_cpp_check"]
    assert set(checks) == {"adapter", "merged"} and all(c["new_tokens"] > 0 for c in checks.values())
    assert manifest["speed_reference"] is None        # served FROM base + ADAPTER: the base's own format


def test_export_of_an_untrained_variant_is_a_one_line_error(exported: Path, tmp_path: Path):
    params = tmp_path / "params.yaml"
    raw = yaml.safe_load((exported / "params.yaml").read_text())
    raw["variants"]["peft_lora"] = {"engine": "peft", "grit": False}
    raw["variants"]["pure_grit"]["control"] = "peft_lora"
    params.write_text(yaml.safe_dump(raw))
    result = run(exported, "pipelines.export", "--variant", "peft_lora", "--params", str(params))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: artifacts/adapters/peft_lora holds no adapter; run `dvc repro train@peft_lora` first"]


def test_export_and_serve_skip_a_dora_variant_in_one_line_each(exported: Path, tmp_path: Path):
    """DoRA is a params change that trains (PEFT) but has no GGUF form: export@ and serve each say
    so in one line and go on, so that `dvc repro` finishes (evaluate measures it in fp32)."""
    params = tmp_path / "params.yaml"
    raw = yaml.safe_load((exported / "params.yaml").read_text())
    raw["variants"]["peft_dora"] = {"engine": "peft", "lora_overrides": {"use_dora": True}}
    params.write_text(yaml.safe_dump(raw))
    why = "DoRA adapters cannot be served: llama.cpp's LoRA converter takes lora_A/lora_B tensors only"

    result = run(exported, "pipelines.export", "--variant", "peft_dora", "--params", str(params))
    assert result.returncode == 0, result.stderr[-3000:]
    (line,) = [line for line in result.stdout.splitlines() if "skipped" in line]
    assert line.startswith(f"[export@peft_dora] skipped: {why}")
    folder = exported / "artifacts/export/peft_dora"
    assert [p.name for p in folder.iterdir()] == ["skipped.json"]            # the output dvc.yaml declares
    assert json.loads((folder / "skipped.json").read_text())["skipped"].startswith(why)

    result = run(exported, "pipelines.serve", "--params", str(params), env={"OLLAMA_HOST": "http://127.0.0.1:9"})
    assert result.returncode == 0, result.stderr[-3000:]
    (line,) = [line for line in result.stdout.splitlines() if "peft_dora" in line]
    assert line.startswith(f"[serve] peft_dora: skipped: {why}")
    manifest = json.loads((exported / "artifacts/serve/manifest.json").read_text())
    assert set(manifest["models"]) == {"base", "pure_grit"} and set(manifest["not_served"]) == {"peft_dora"}


def _single_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    return lines[0]


def test_serve_reports_a_failing_server_in_one_line(exported: Path, tmp_path: Path):
    with OllamaStandIn(tmp_path / "blobs", create_status=500) as server:
        line = _single_error(run(exported, "pipelines.serve", env={"OLLAMA_HOST": server.url}))
    assert f"the Ollama server at {server.url} failed to register base_model (HTTP 500)" in line


@pytest.mark.parametrize("damage", ["truncate", "alter"])
def test_serve_refuses_a_gguf_that_changed_since_its_export(exported: Path, tmp_path: Path, damage: str):
    merged = exported / "artifacts/export/pure_grit/merged.gguf"
    original = merged.read_bytes()
    try:
        merged.write_bytes(original[: len(original) // 2] if damage == "truncate"
                           else original[:-1] + bytes([original[-1] ^ 0xFF]))
        with OllamaStandIn(tmp_path / "blobs") as server:
            line = _single_error(run(exported, "pipelines.serve", env={"OLLAMA_HOST": server.url}))
            assert not [p for m, p in server.requests if m == "POST"]         # nothing was uploaded
        assert "merged.gguf does not match the sha256 recorded in" in line and "dvc repro -f export" in line
        line = _single_error(run(exported, "pipelines.serve", env={"OLLAMA_HOST": "http://127.0.0.1:9"}))
        assert "does not match the sha256" in line                            # nor loaded by llama.cpp
    finally:
        merged.write_bytes(original)
