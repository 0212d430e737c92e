"""Chat templates the tests need besides SmolLM2's own (which the tiny model's tokenizer carries)."""

from __future__ import annotations

import copy

# Meta-Llama-3-8B-Instruct's Jinja chat template (it trims each message's content).
LLAMA3_JINJA = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def with_llama3_template(tokenizer):
    """A copy of ``tokenizer`` that renders conversations with Llama-3's template."""
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_special_tokens({"bos_token": "<|begin_of_text|>"})
    tokenizer.chat_template = LLAMA3_JINJA
    return tokenizer
