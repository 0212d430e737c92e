"""The chat format: detected from the tokenizer, proven to render exactly like it, or an error."""

from __future__ import annotations

import copy

import pytest
from chat_templates import with_llama3_template

from export.chat_format import ChatTemplateError, chat_format
from trainers.base_model import load_tokenizer, resolve_base_model
from trainers.config import ModelParams


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
    chat = chat_format(with_llama3_template(smollm_tokenizer))
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
