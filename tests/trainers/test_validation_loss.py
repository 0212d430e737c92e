"""Validation loss during training: the response-token loss the models train on, pooled over
batches by token count, measured without gradients and without disturbing training."""

from __future__ import annotations

import pytest
import torch

from tests.tiny_lora import VOCAB, tiny_lora_model
from trainers.sft import ValidationLoss, summed_token_loss


def examples(n: int, seed: int = 3) -> list[dict]:
    """Examples of different lengths whose first tokens (the prompt) are not scored."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(0, VOCAB, (6 + 2 * i,), generator=generator).tolist()
        out.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:]})
    return out


def test_summed_token_loss_is_the_models_own_mean_loss_times_the_scored_tokens():
    model = tiny_lora_model(random_B=True).eval()
    batch = ValidationLoss(examples(3), pad_id=0, every=1, batch_size=3).batches[0]
    with torch.no_grad():
        output = model(**batch)
    total, count = summed_token_loss(output.logits, batch["labels"])
    assert count == int((batch["labels"][:, 1:] != -100).sum())
    assert total / count == pytest.approx(float(output.loss), rel=1e-5)


def test_the_validation_loss_pools_batches_by_tokens_not_by_batches():
    model = tiny_lora_model(random_B=True)
    held_out = examples(5)
    whole = ValidationLoss(held_out, pad_id=0, every=1, batch_size=5).measure(model)
    one_by_one = ValidationLoss(held_out, pad_id=0, every=1, batch_size=1).measure(model)
    assert one_by_one == pytest.approx(whole, rel=1e-5)
    # the mean of per-example means differs when examples differ in length: that is not what is measured
    per_example = [ValidationLoss([e], pad_id=0, every=1, batch_size=1).measure(model) for e in held_out]
    assert abs(sum(per_example) / len(per_example) - whole) > 1e-4


def test_measuring_keeps_the_training_mode_and_leaves_no_gradient():
    model = tiny_lora_model(random_B=True).train()
    ValidationLoss(examples(2), pad_id=0, every=1, batch_size=2).measure(model)
    assert model.training
    assert all(p.grad is None for p in model.parameters())


def test_it_is_due_every_few_steps_and_at_the_last_one():
    validation = ValidationLoss(examples(1), pad_id=0, every=8, batch_size=1)
    assert [s for s in range(1, 21) if validation.due(s, 20)] == [8, 16, 20]
    at_rungs = ValidationLoss(examples(1), pad_id=0, every=8, batch_size=1, at=[8, 24])
    assert [s for s in range(1, 33) if at_rungs.due(s, 32)] == [8, 24, 32]


def test_an_empty_validation_split_is_refused():
    with pytest.raises(ValueError, match="validation split is empty"):
        ValidationLoss([], pad_id=0, every=1, batch_size=1)
