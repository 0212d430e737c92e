"""The REAL Ollama server: the build of ``make setup`` (``export/ollama_build.py``), started on a
free loopback port with a temporary model store, driven through its own CLI as a user drives it.

The tiny exported model (``conftest.tiny_export``: a random Llama with the SmolLM2 tokenizer, a
GGUF LoRA made by llama.cpp's converter, and the merged GGUF) is registered from our Modelfiles
with ``ollama create -f``; ``show`` must return our template, stops and greedy options; ``ollama
run`` answers; a ``cp``-made alias answers the same; a truncated adapter, an adapter for another
base and one for another architecture are refused by the server and reported in one line.
Without the build the tests FAIL (``installed_binary`` raises): a test skipped for a missing
dependency is a failure in this project.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import ollama
import pytest

from export.decoding import GREEDY
from export.gguf_edit import _copy_fields, _write
from export.modelfile import ServedModel
from export.ollama import check_shown, register, server_failure
from export.ollama_build import OLLAMA_VERSION
from export.ollama_server import (
    OllamaCliError,
    check_answers,
    check_greedy,
    copy,
    create,
    run,
)
from trainers.base_model import embedded_gguf_path

PROMPT = "Hello?"
REAL_PROMPTS = ("How do I pick a lock?", "Name three colours.", "Write a haiku about rain.",
                "What is the capital of France? Answer in one sentence.")


@pytest.fixture(scope="session")
def merged_model(server, tiny_export, tmp_path_factory) -> str:
    """The merged GGUF registered from its Modelfile, as ``make ollama`` registers it."""
    modelfile = tmp_path_factory.mktemp("merged") / "Modelfile"
    modelfile.write_text(tiny_export.modelfile("merged"))
    create(server, "tiny_merged", modelfile)
    return "tiny_merged"


def _adapter_modelfile(served, folder: Path, adapter_bytes: bytes) -> Path:
    """FROM the base + ``ADAPTER ./adapter.gguf``, relative to the Modelfile as the export writes it."""
    (folder / "adapter.gguf").write_bytes(adapter_bytes)
    modelfile = folder / "Modelfile"
    modelfile.write_text(served.modelfile("adapter").replace(f"ADAPTER {served.adapter_gguf}",
                                                             "ADAPTER ./adapter.gguf"))
    return modelfile


def _said(reply) -> tuple[str, int]:
    return reply.text, reply.new_tokens


def test_the_build_reports_its_pinned_version(server):
    assert ollama.Client(host=server.url)._client.get("/api/version").json()["version"] == OLLAMA_VERSION


def test_a_merged_gguf_from_our_modelfile_shows_what_we_wrote_and_answers(server, merged_model, tiny_export):
    shown = ollama.Client(host=server.url).show(merged_model)
    said = check_shown(shown, tiny_export, "merged")
    assert said == f"merged weights, template, {len(tiny_export.chat.stops)} stops and greedy decoding match"
    check_greedy(server, merged_model, Path("Modelfile"))
    assert "repeat_penalty" in shown.parameters and shown.template.strip() == tiny_export.chat.ollama_template.strip()
    reply = run(server, merged_model, PROMPT)          # the random tiny model says newlines, 8 of them
    assert reply.new_tokens == tiny_export.parameters["num_predict"] and reply.decode_tokens_per_second > 0


def test_an_adapter_from_our_modelfile_is_attached_and_answers(server, tiny_export, tmp_path: Path):
    modelfile = _adapter_modelfile(tiny_export, tmp_path, tiny_export.adapter_gguf.read_bytes())
    create(server, "tiny_adapter", modelfile)
    shown = ollama.Client(host=server.url).show("tiny_adapter")
    assert "ADAPTER attached" in check_shown(shown, tiny_export, "adapter")
    assert run(server, "tiny_adapter", PROMPT).new_tokens == tiny_export.parameters["num_predict"]


def test_an_alias_made_with_cp_answers_as_its_model(server, merged_model):
    copy(server, merged_model, "tiny_alias")
    assert _said(run(server, "tiny_alias", PROMPT)) == _said(run(server, merged_model, PROMPT))   # greedy


def test_a_modelfile_without_the_greedy_options_is_caught(server, tiny_export, tmp_path: Path):
    """A Modelfile exported before the options were stated decodes with Ollama's repeat_penalty 1.1."""
    old = dataclasses.replace(tiny_export, parameters={})
    text = "\n".join(line for line in old.modelfile("merged").splitlines()
                     if not any(line.startswith(f"PARAMETER {key} ") for key in GREEDY))
    (tmp_path / "Modelfile").write_text(text + "\n")
    create(server, "tiny_old", tmp_path / "Modelfile")
    with pytest.raises(OllamaCliError, match=r"repeat_penalty unset.*export it again with `dvc repro`"):
        check_greedy(server, "tiny_old", tmp_path / "Modelfile")


@pytest.mark.parametrize(("kept", "refused_by", "reason"), [
    (0.02, "create", "failed to read tensor dimensions"),          # cut in the header: create refuses it
    (0.5, "load", "llama runner process has terminated"),          # cut in the data: the first load fails
])
def test_a_truncated_adapter_is_refused_by_the_server_in_one_line(server, tiny_export, tmp_path: Path, kept: float,
                                                                  refused_by: str, reason: str):
    whole = tiny_export.adapter_gguf.read_bytes()
    modelfile = _adapter_modelfile(tiny_export, tmp_path, whole[: int(len(whole) * kept)])
    name = f"tiny_cut_{refused_by}"
    with pytest.raises(OllamaCliError) as cli:
        create(server, name, modelfile)
        check_answers(server, name)
    said = str(cli.value)
    assert "\n" not in said and reason in said
    told = f"`ollama create {name} -f" if refused_by == "create" else f"{name} was registered but does not load"
    assert told in said
    # the serve stage's path (the official client) meets the same refusal and says it in one line
    truncated = dataclasses.replace(tiny_export, name=name, adapter_gguf=tmp_path / "adapter.gguf")
    with pytest.raises(ollama.ResponseError) as client:
        register(ollama.Client(host=server.url), truncated, "adapter", PROMPT, 4, {})
    line = server_failure(server.url, name, client.value)
    assert "\n" not in line and f"failed to register {name}" in line and reason in line


def _with_architecture(adapter: Path, architecture: str, out: Path) -> Path:
    """``adapter`` with its ``general.architecture`` rewritten: a LoRA converted for another model family."""
    import gguf

    reader = gguf.GGUFReader(adapter)
    writer = gguf.GGUFWriter(out, arch=architecture)
    _copy_fields(reader, writer, skip=lambda _name: False)       # every field but the architecture
    _write(writer, [(tensor.name, tensor.data, tensor.tensor_type) for tensor in reader.tensors])
    return out


@pytest.mark.parametrize(("mismatch", "reason"), [
    ("base", "has incorrect shape (hint: maybe wrong base model?)"),   # SmolLM2-135M under the tiny model's LoRA
    ("architecture", "model arch and LoRA arch mismatch"),             # the tiny LoRA relabelled qwen2
])
def test_an_adapter_for_another_model_is_refused_by_the_server_with_llama_cpps_reason(
        server, tiny_export, tmp_path: Path, mismatch: str, reason: str):
    adapter = tiny_export.adapter_gguf
    if mismatch == "base":
        served = dataclasses.replace(tiny_export, base_gguf=embedded_gguf_path())
    else:
        served, adapter = tiny_export, _with_architecture(adapter, "qwen2", tmp_path / "qwen2-adapter.gguf")
    modelfile = _adapter_modelfile(served, tmp_path, adapter.read_bytes())
    name = f"tiny_wrong_{mismatch}"
    create(server, name, modelfile)            # the server takes the files; the runner refuses them
    with pytest.raises(OllamaCliError) as refused:
        check_answers(server, name)
    said = str(refused.value)
    assert "\n" not in said and f"{name} was registered but does not load" in said
    assert "failed to apply lora adapter: " in said and reason in said


def test_make_ollama_registers_every_served_model_with_its_aliases(server, tiny_export, tmp_path: Path,
                                                                  monkeypatch, capsys):
    """``python -m pipelines.ollama start`` after a run: its own server, every name, the line to type."""
    from pipelines import ollama as make_ollama

    monkeypatch.chdir(tmp_path)
    export = tmp_path / "artifacts/export/pure_grit"
    export.mkdir(parents=True)
    shutil.copy(tiny_export.merged_gguf, export / "merged.gguf")
    (export / "Modelfile.merged").write_text(tiny_export.modelfile("merged").replace(
        f"FROM {tiny_export.merged_gguf}", "FROM ./merged.gguf"))
    (tmp_path / "base.Modelfile").write_text(tiny_export.modelfile("adapter").replace(
        f"ADAPTER {tiny_export.adapter_gguf}\n", ""))
    manifest = tmp_path / "artifacts/serve/manifest.json"
    manifest.parent.mkdir(parents=True)
    files = {"base_gguf": str(tiny_export.base_gguf), "chat_family": tiny_export.chat.family}
    manifest.write_text(json.dumps({"backend": "ollama", "models": {
        "base": {**files, "ollama_name": "base_model", "modelfile": "base.Modelfile", "aliases": []},
        "pure_grit": {**files, "ollama_name": "pure_grit_model", "modelfile": str(export / "Modelfile.merged"),
                      "aliases": ["grit_model"]}}}))
    try:
        assert make_ollama.main(["start"]) == 0
        said = capsys.readouterr().out
        started = make_ollama.recorded_server()
        assert started is not None and started.pid != server.pid
        listed = started.cli("list").stdout
        assert all(name in listed for name in ("base_model", "pure_grit_model", "grit_model"))
        line = said.strip().splitlines()[-2]
        assert line == started.command_line("run", "pure_grit_model", make_ollama.TRY_PROMPT)
        assert _said(run(started, "grit_model", PROMPT)) == _said(run(started, "pure_grit_model", PROMPT))
        assert make_ollama.main(["start"]) == 0                 # again: the same server, registered anew
        assert make_ollama.recorded_server().pid == started.pid
    finally:
        assert make_ollama.main(["stop"]) == 0
    assert make_ollama.recorded_server() is None and "stopped the Ollama server" in capsys.readouterr().out


def test_make_ollama_before_a_run_says_what_to_do(tmp_path: Path, monkeypatch, capsys):
    from pipelines import ollama as make_ollama

    monkeypatch.chdir(tmp_path)
    assert make_ollama.main(["start"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: artifacts/serve/manifest.json is missing: no models have been served yet; run `make run` first")


@pytest.mark.slow      # SmolLM2-135M, the package's Q4_1 GGUF
def test_ollama_run_answers_what_the_evaluation_measured(server, tiny_export, tmp_path: Path):
    """``ollama run`` as typed in a terminal replies, token for token, what the evaluation's
    llama.cpp greedy path replies on the same file; with Ollama's default repeat_penalty (1.1) the
    replies part (measured: all 4 prompts here)."""
    from export.backend import LlamaCppModel
    from trainers.base_model import embedded_gguf_path

    served = ServedModel(name="smollm2", variant="base", base_gguf=embedded_gguf_path(), chat=tiny_export.chat,
                         parameters={"seed": 0, "num_predict": 24, "num_ctx": 2048, "num_thread": 1})
    (tmp_path / "Modelfile").write_text(served.modelfile())
    create(server, served.name, tmp_path / "Modelfile")
    # one thread each: two engines (and the rest of the suite) share 2 cores
    client, llm = ollama.Client(host=server.url), LlamaCppModel(served.base_gguf, served.chat, n_threads=1)
    penalised = 0
    for prompt in REAL_PROMPTS:
        measured = llm.generate(prompt, 24).text
        assert run(server, served.name, prompt).text == measured, prompt
        default = client.generate(model=served.name, prompt=prompt, options={"repeat_penalty": 1.1})
        penalised += default.response.strip() != measured
    llm.close()
    assert "Paris" in measured and penalised >= 2
