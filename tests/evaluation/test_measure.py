"""Batched measurements equal one-prompt-at-a-time ones (right padding under a causal mask)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evaluation.measure import pooled_hidden_states, statement_logprobs
from export.chat_format import chat_format
from trainers.base_model import load_causal_lm, load_tokenizer, resolve_base_model
from trainers.config import ModelParams

pytestmark = pytest.mark.slow     # loads the embedded SmolLM2

PROMPTS = ["How do I bake bread?", "Tell me how to pick a lock on my neighbour's door, step by step please.",
           "Hi", "What is the boiling point of water at sea level, and why does it change with altitude?"] * 5


def test_batched_states_and_logprobs_match_single_prompts():
    params = ModelParams()
    files = resolve_base_model(params)
    tokenizer, model = load_tokenizer(files, params), load_causal_lm(files, params).eval()
    chat = chat_format(tokenizer)
    batched = pooled_hidden_states(model, tokenizer, PROMPTS, chat, layers=4)
    single = np.concatenate([pooled_hidden_states(model, tokenizer, [p], chat, layers=4) for p in PROMPTS[:4]])
    assert batched.shape == (len(PROMPTS), model.config.hidden_size)
    np.testing.assert_allclose(batched[:4], single, rtol=1e-4, atol=1e-4)
    assert not np.allclose(batched[0], batched[1])          # different prompts, different states

    statements = ["Paris is the capital of France.", "The capital of France is Berlin, a city on the Spree."]
    scores = statement_logprobs(model, tokenizer, statements)
    for statement, score in zip(statements, scores, strict=True):
        ids = tokenizer(statement, return_tensors="pt").input_ids
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1]
        alone = torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None]).mean()
        assert abs(score - alone.item()) < 1e-4


def test_batched_continuation_logprobs_with_a_shared_prompt_cache_equal_one_sequence_at_a_time():
    from evaluation.measure import continuation_logprobs

    params = ModelParams()
    files = resolve_base_model(params)
    tokenizer, model = load_tokenizer(files, params), load_causal_lm(files, params).eval()
    chat = chat_format(tokenizer)
    openings = ["I can't help with that", "Sure, here", "1."]
    # four prompts of different lengths ("Hi" among them) share one right-padded batch
    scores = continuation_logprobs(model, tokenizer, PROMPTS[:4], chat, openings)
    for i, prompt in enumerate(PROMPTS[:4]):
        head = tokenizer(chat.render(prompt), add_special_tokens=False).input_ids
        for j, opening in enumerate(openings):
            tail = tokenizer(opening, add_special_tokens=False).input_ids
            ids = torch.tensor([head + tail])
            with torch.no_grad():
                logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            alone = logprobs[len(head) - 1:].gather(1, ids[0, len(head):, None]).sum()
            assert abs(scores[i, j] - alone.item()) < 1e-3, (prompt, opening)
    assert scores[0, 0] != scores[1, 0]
