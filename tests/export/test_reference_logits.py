"""The parity reference (the PEFT model's next-token logits) is computed in padded batches and
must equal what each prompt computes alone: a wrong last position would compare a pad's logits."""

from __future__ import annotations

import numpy as np
import torch

from export.chat_format import chat_format
from export.parity import peft_next_token_logits
from trainers.base_model import load_tokenizer, resolve_base_model
from trainers.config import ModelParams

# different lengths, so every batch of two is padded and the order by length differs from this one
PROMPTS = ["Hi", "Name three colours of the rainbow and say which is warmest.", "What is 2 + 2?",
           "Tell me a short story about a cat who learns to sail across the sea.", "Why?"]


def test_batched_reference_logits_equal_one_prompt_at_a_time(tiny_peft):
    params = ModelParams(source="tiny")
    tokenizer = load_tokenizer(resolve_base_model(params), params)
    chat = chat_format(tokenizer)
    model = tiny_peft
    batched = peft_next_token_logits(model, tokenizer, PROMPTS, chat, batch_size=2)
    assert len(batched) == len(PROMPTS)
    with torch.no_grad():
        for prompt, row in zip(PROMPTS, batched, strict=True):
            ids = tokenizer(chat.render(prompt), add_special_tokens=False, return_tensors="pt").input_ids
            alone = model(input_ids=ids).logits[0, -1].double().numpy()
            np.testing.assert_allclose(row, alone, atol=1e-5)
    assert np.abs(batched[0] - batched[1]).max() > 1e-3     # the prompts do give different logits
