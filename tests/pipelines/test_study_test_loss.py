"""The study's test loss is resampled over its examples as well as seeds (issue 60): a test trial
records one value per example whose mean is the pooled loss."""

import json

import pytest

from evaluation.stats import pooled_contributions


def test_contributions_average_to_the_pooled_mean_not_the_mean_of_means():
    mean, values = pooled_contributions([2.0, 12.0], [1, 3])          # 14 over 4 tokens
    assert mean == pytest.approx(3.5) and sum(values) / len(values) == pytest.approx(3.5)
    assert values == pytest.approx([1.0, 6.0])                         # not the example means 2 and 4
    with pytest.raises(ValueError, match="as many sums as counts"):
        pooled_contributions([1.0], [0])


def test_a_test_trial_keeps_one_loss_value_per_example(tmp_path):
    from pipelines.study.trial import split_loss
    from trainers.base_model import load_causal_lm, load_tokenizer, resolve_base_model
    from trainers.config import ModelParams
    from trainers.sft import ValidationLoss, tokenized_examples

    params = ModelParams(source="tiny")
    files = resolve_base_model(params)
    model, tokenizer = load_causal_lm(files, params).eval(), load_tokenizer(files, params)
    rows = [{"prompt": f"Question {i}: what is {i} plus {i}?", "response": f"It is {2 * i}." + " Indeed." * i}
            for i in range(5)]
    path = tmp_path / "test.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    loss, per_example = split_loss(model, tokenizer, path)
    pooled = ValidationLoss(tokenized_examples(rows, tokenizer), tokenizer.pad_token_id, 1, 1).measure(model)
    assert len(per_example) == 5 and len(set(per_example)) == 5
    assert loss == pytest.approx(pooled, rel=1e-6) and sum(per_example) / 5 == pytest.approx(loss, rel=1e-9)
