"""The chat format: detected from the tokenizer, proven to render exactly like it, or an error."""

from __future__ import annotations

import copy

import pytest
from ollama_standin import render_go_template

from export.chat_format import CHATML, LLAMA3, ChatTemplateError, chat_format
from trainers.base_model import load_tokenizer, resolve_base_model
from trainers.config import ModelParams

LLAMA3_JINJA = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def smollm_tokenizer():
    params = ModelParams(source="tiny")   # the tiny model carries the real SmolLM2 tokenizer
    return load_tokenizer(resolve_base_model(params), params)


def test_smollm2_is_chatml_with_its_default_system_prompt(smollm_tokenizer):
    chat = chat_format(smollm_tokenizer)
    assert chat.family == "chatml" and chat.default_system.startswith("You are a helpful AI assistant named SmolLM")
    expected = smollm_tokenizer.apply_chat_template([{"role": "user", "content": "Hi there"}], tokenize=False,
                                                    add_generation_prompt=True)
    assert chat.render("Hi there") == expected


def test_llama3_template_is_recognised(smollm_tokenizer):
    tokenizer = copy.deepcopy(smollm_tokenizer)
    tokenizer.add_special_tokens({"bos_token": "<|begin_of_text|>"})
    tokenizer.chat_template = LLAMA3_JINJA
    chat = chat_format(tokenizer)
    assert chat.family == "llama3" and chat.default_system is None
    assert chat.render("Hi") == "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>" \
                                "<|start_header_id|>assistant<|end_header_id|>\n\n"


@pytest.mark.parametrize("template", ["{% for m in messages %}{{ m['content'] }}{% endfor %}", None])
def test_unknown_template_is_an_error(smollm_tokenizer, template):
    tokenizer = copy.deepcopy(smollm_tokenizer)
    tokenizer.chat_template = template
    with pytest.raises(ChatTemplateError, match="none of the supported families"):
        chat_format(tokenizer)


def test_a_chatml_variant_that_renders_differently_is_an_error(smollm_tokenizer):
    tokenizer = copy.deepcopy(smollm_tokenizer)
    tokenizer.chat_template = tokenizer.chat_template.replace("+ message['role'] +", "+ message['role'] + ':' +")
    assert tokenizer.chat_template != smollm_tokenizer.chat_template
    with pytest.raises(ChatTemplateError, match="renders differently"):
        chat_format(tokenizer)


@pytest.mark.parametrize("family", [CHATML, LLAMA3])
@pytest.mark.parametrize("system", ["Be brief.", ""])
def test_the_ollama_template_renders_what_llama_cpp_is_given(family, system):
    # The Go TEMPLATE (rendered the way Ollama renders it for generate) and ChatFormat.render
    # must produce the same prompt, with and without a system prompt.
    go = render_go_template(family.ollama_template, {"System": system, "Prompt": "What is 2+2?"})
    assert family.bos + go == family.render("What is 2+2?", system)
