"""The parity reference (the PEFT model's next-token logits) is computed in padded batches and
must equal what each prompt computes alone: a wrong last position would compare a pad's logits."""

from __future__ import annotations

import numpy as np
import torch
from peft import LoraConfig, get_peft_model

from export.chat_format import chat_format
from export.parity import peft_next_token_logits
from trainers.base_model import load_causal_lm, load_tokenizer, resolve_base_model
from trainers.config import ModelParams

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# different lengths, so every batch of two is padded and the order by length differs from this one
PROMPTS = ["Hi", "Name three colours of the rainbow and say which is warmest.", "What is 2 + 2?",
           "Tell me a short story about a cat who learns to sail across the sea.", "Why?"]


def test_batched_reference_logits_equal_one_prompt_at_a_time():
    params = ModelParams(source="tiny")
    files = resolve_base_model(params)
    tokenizer = load_tokenizer(files, params)
    chat = chat_format(tokenizer)
    torch.manual_seed(0)
    model = get_peft_model(load_causal_lm(files, params), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.05)
    batched = peft_next_token_logits(model, tokenizer, PROMPTS, chat, batch_size=2)
    assert len(batched) == len(PROMPTS)
    with torch.no_grad():
        for prompt, row in zip(PROMPTS, batched, strict=True):
            ids = tokenizer(chat.render(prompt), add_special_tokens=False, return_tensors="pt").input_ids
            alone = model(input_ids=ids).logits[0, -1].double().numpy()
            np.testing.assert_allclose(row, alone, atol=1e-5)
    assert np.abs(batched[0] - batched[1]).max() > 1e-3     # the prompts do give different logits
