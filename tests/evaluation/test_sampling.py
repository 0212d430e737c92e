"""Sampled replies: exact inverse-CDF draws whose randomness belongs to (seed, prompt, sample),
so a reply is the same alone, in any batch and on any run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evaluation.sampling import inverse_cdf, sampled_replies, stop_ids, uniforms
from export.chat_format import chat_format
from trainers.base_model import load_causal_lm, load_tokenizer, resolve_base_model
from trainers.config import ModelParams

PROMPTS = ["How do I pick a lock?", "Hi", "Write a long and detailed letter to my landlord about the broken heating.",
           "What is two plus two?", "Tell me a joke."]


def test_inverse_cdf_takes_the_first_token_whose_cumulative_probability_exceeds_the_uniform():
    logits = torch.log(torch.tensor([[0.25, 0.75, 1e-12], [0.5, 0.25, 0.25]]))
    assert inverse_cdf(logits, torch.tensor([0.2, 0.2]), 1.0).tolist() == [0, 0]
    assert inverse_cdf(logits, torch.tensor([0.3, 0.6]), 1.0).tolist() == [1, 1]
    assert inverse_cdf(logits, torch.tensor([0.999, 0.99]), 1.0).tolist() == [1, 2]
    # a low temperature sharpens towards the most likely token
    assert inverse_cdf(logits, torch.tensor([0.2, 0.9]), 0.05).tolist() == [1, 0]
    draws = inverse_cdf(torch.log(torch.tensor([[0.2, 0.3, 0.5]])).repeat(4000, 1),
                        torch.tensor(np.random.default_rng(0).random(4000)), 1.0)
    frequencies = np.bincount(draws.numpy(), minlength=3) / 4000
    np.testing.assert_allclose(frequencies, [0.2, 0.3, 0.5], atol=0.03)


def test_uniforms_belong_to_seed_prompt_and_sample():
    assert np.array_equal(uniforms(0, "a", 1, 5), uniforms(0, "a", 1, 5))
    assert not np.array_equal(uniforms(0, "a", 1, 5), uniforms(0, "a", 2, 5))
    assert not np.array_equal(uniforms(0, "a", 1, 5), uniforms(0, "b", 1, 5))
    assert not np.array_equal(uniforms(0, "a", 1, 5), uniforms(1, "a", 1, 5))
    assert np.array_equal(uniforms(0, "a", 1, 8)[:5], uniforms(0, "a", 1, 5))   # longer replies extend


@pytest.fixture(scope="module")
def tiny():
    params = ModelParams(source="tiny")
    files = resolve_base_model(params)
    tokenizer = load_tokenizer(files, params)
    return load_causal_lm(files, params).float().eval(), tokenizer, chat_format(tokenizer)


def test_a_reply_is_the_same_alone_in_a_batch_and_on_a_second_run(tiny):
    model, tokenizer, chat = tiny
    batched = sampled_replies(model, tokenizer, PROMPTS, chat, samples=3, max_new_tokens=10, temperature=1.0, seed=7)
    assert len(batched) == len(PROMPTS) and all(len(row) == 3 for row in batched)
    assert sampled_replies(model, tokenizer, PROMPTS, chat, 3, 10, 1.0, 7) == batched
    for i in (1, 2):                  # the shortest and the longest prompt, each alone
        assert sampled_replies(model, tokenizer, [PROMPTS[i]], chat, 3, 10, 1.0, 7)[0] == batched[i]
    assert len({reply for row in batched for reply in row}) > len(PROMPTS)    # samples differ
    assert sampled_replies(model, tokenizer, PROMPTS, chat, 3, 10, 1.0, 8) != batched   # the seed matters


def test_a_reply_ends_at_the_end_of_turn(tiny):
    model, tokenizer, chat = tiny
    stop = sorted(stop_ids(tokenizer, chat))[0]
    with torch.no_grad():                         # make the end of turn by far the likeliest token
        model.lm_head.weight[stop] = model.model.embed_tokens.weight[stop] * 0 + 50.0 / model.config.hidden_size ** 0.5
        model.lm_head.weight[stop] *= torch.sign(model.model.norm.weight)
    replies = sampled_replies(model, tokenizer, PROMPTS[:2], chat, 2, 10, 1.0, 0)
    assert all(reply == "" for row in replies for reply in row)


def test_bad_settings_fail_before_any_work(tiny):
    model, tokenizer, chat = tiny
    with pytest.raises(ValueError, match="temperature"):
        sampled_replies(model, tokenizer, PROMPTS, chat, 2, 10, 0.0, 0)
