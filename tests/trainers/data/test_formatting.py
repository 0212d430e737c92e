"""Labels are -100 exactly on prompt and padding positions of real tokenised examples."""

from __future__ import annotations

import pytest

from trainers.base_model import load_tokenizer, resolve_base_model
from trainers.config import ModelParams
from trainers.data.formatting import IGNORE_INDEX, fit_to_length, pad_batch, tokenize_chat
from trainers.data.refusals import REFUSALS, refusal_for
from trainers.data.sources import chatterbot_conversations, harmbench_prompts


@pytest.fixture(scope="module")
def tokenizer():
    params = ModelParams(source="tiny")
    return load_tokenizer(resolve_base_model(params), params)


@pytest.fixture(scope="module")
def real_examples():
    harmful = [(p.text, refusal_for(p.id, 0)) for p in harmbench_prompts()[:20]]
    benign = [(p.text, p.response) for p in chatterbot_conversations()[:20]]
    return harmful + benign


def test_labels_cover_exactly_the_response_and_end_of_turn(tokenizer, real_examples):
    eot = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for prompt, response in real_examples:
        example = tokenize_chat(tokenizer, prompt, response)
        prompt_ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=True, add_generation_prompt=True,
            return_dict=True)["input_ids"]
        n_prompt = len(prompt_ids)
        assert example.input_ids[:n_prompt] == list(prompt_ids)
        assert example.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
        assert example.labels[n_prompt:] == example.input_ids[n_prompt:]
        assert example.labels[-1] == eot and example.input_ids.count(eot) == 3  # system, user, assistant
        assert tokenizer.decode(example.labels[n_prompt:-1]) == response


def test_padding_is_dynamic_and_masked(tokenizer, real_examples):
    examples = [tokenize_chat(tokenizer, p, r) for p, r in real_examples[:8]]
    batch = pad_batch(examples, tokenizer.pad_token_id)
    longest = max(len(e.input_ids) for e in examples)
    assert batch["input_ids"].shape == (8, longest)  # the batch's own longest, not a global maximum
    for row, example in enumerate(examples):
        n, n_prompt = len(example.input_ids), example.prompt_length
        labels, attention = batch["labels"][row].tolist(), batch["attention_mask"][row].tolist()
        assert attention == [1] * n + [0] * (longest - n)
        masked = [i for i, label in enumerate(labels) if label == IGNORE_INDEX]
        assert masked == list(range(n_prompt)) + list(range(n, longest))


def test_overlong_drop_and_truncate_prompt(tokenizer):
    prompt = "background " * 200 + "So what is the capital of France?"
    assert fit_to_length(tokenizer, prompt, "Paris.", 80, "drop") is None
    example, used = fit_to_length(tokenizer, prompt, "Paris.", 80, "truncate_prompt")
    assert len(example.input_ids) <= 80 and used.endswith("So what is the capital of France?")
    assert tokenizer.decode(example.labels[example.prompt_length:-1]) == "Paris."
    assert fit_to_length(tokenizer, "hi", "word " * 200, 80, "truncate_prompt") is None


def test_refusals_vary_and_are_deterministic():
    chosen = {refusal_for(f"id-{i}", 42) for i in range(200)}
    assert chosen == set(REFUSALS)
    assert refusal_for("id-7", 42) == refusal_for("id-7", 42)
