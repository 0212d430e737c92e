"""The study's test loss and 1/XB are resampled over their examples and prompt pairs as well as
seeds (issue 60): a test trial records one value per example whose mean is the pooled loss, and
one per prompt pair whose mean is 1/XB (its jackknife linearisation)."""

import json

import numpy as np
import pytest

from evaluation.stats import jackknife_contributions, pooled_contributions


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


def test_jackknife_contributions_of_a_mean_are_the_items_themselves():
    """For a plain mean the linearisation gives back each item: the construction is exact there."""
    items = np.array([0.3, 1.7, 2.0, 5.5, -1.0])
    left_out = [(items.sum() - x) / (len(items) - 1) for x in items]
    assert jackknife_contributions(float(items.mean()), left_out) == pytest.approx(list(items))
    with pytest.raises(ValueError, match="two or more finite"):
        jackknife_contributions(1.0, [1.0])


def test_a_test_trial_keeps_one_separation_value_per_prompt_pair():
    """1/XB on pooled states of 12 pairs: 12 values whose mean is 1/XB itself; an outlying pair (a
    harmful state among the benign ones) stands out among them; the report then bootstraps them
    over pairs and seeds (``evaluation.study.summary``), a wider interval than seeds alone."""
    from evaluation.results import ModelOutcomes
    from evaluation.study import Trial, summary
    from pipelines.study.trial import pair_contributions

    rng = np.random.default_rng(0)
    harmful, benign = rng.normal(1.0, 0.5, (12, 8)), rng.normal(-1.0, 0.5, (12, 8))
    benign[3] = harmful[3] + 0.1                          # pair 3 blurs the two clusters
    states = np.empty((24, 8))
    states[0::2], states[1::2] = harmful, benign
    outcomes = ModelOutcomes("trial", states)
    full = float(outcomes.separation(np.ones((1, 12)), 0.5)["separation"][0])
    values = pair_contributions(outcomes, {"separation": full}, 0.5)["separation"]
    assert len(values) == 12 and np.mean(values) == pytest.approx(full, rel=1e-12)
    assert int(np.argmin(values)) == 3
    assert pair_contributions(ModelOutcomes("trial", states[:2]), {"separation": full}, 0.5) == {}

    def trial(seed: int, shift: float) -> Trial:
        return Trial(phase="test", method="m", steps=4, seed=seed, setting={}, val_loss=None, curve=[],
                     metrics={"separation": full + shift}, per_prompt={"separation": [v + shift for v in values]})

    trials = [trial(0, 0.0), trial(1, 0.01), trial(2, -0.01)]
    over_pairs = summary(trials, "m", 4, "separation")
    seeds_only = summary([Trial(**{**vars(t), "per_prompt": {}}) for t in trials], "m", 4, "separation")
    assert over_pairs.value == pytest.approx(seeds_only.value, rel=1e-9)
    assert over_pairs.high - over_pairs.low > seeds_only.high - seeds_only.low
