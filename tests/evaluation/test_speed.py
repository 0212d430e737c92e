"""Side-by-side served speed: the paired-ratio arithmetic, the rotation, and a real tiny GGUF."""

from __future__ import annotations

import pytest

from evaluation.speed import SpeedSettings, rotation, side_by_side, speed_ratios, time_one
from export.backend import LlamaCppModel
from export.chat_format import chat_format
from export.gguf import base_gguf
from trainers.base_model import load_tokenizer, resolve_base_model
from trainers.config import ModelParams


def test_a_model_twice_as_fast_in_every_pair_has_ratio_two():
    rates = {"base": {"decode": [10.0, 20.0, 40.0], "prefill": [100.0, 50.0, 80.0]},
             "grit": {"decode": [20.0, 40.0, 80.0], "prefill": [200.0, 100.0, 160.0]}}
    out = speed_ratios(rates)
    assert set(out) == {"grit"}                               # the reference is not compared with itself
    assert out["grit"]["decode_ratio"] == out["grit"]["prefill_ratio"] == 2.0
    assert out["grit"]["n"] == 3
    assert out["grit"]["decode_tokens_per_second"] == 40.0
    assert out["grit"]["reference_decode_tokens_per_second"] == 20.0


def test_a_slow_round_that_hits_both_models_does_not_move_the_ratio():
    # Round 2 runs at a tenth of the speed for both: per-pair ratios stay 1.5, while a ratio of
    # unpaired medians (or means) would not.
    base = [10.0, 10.0, 1.0, 1.0, 10.0]
    lora = [15.0, 15.0, 1.5, 1.5, 15.0]
    out = speed_ratios({"lora": {"decode": lora, "prefill": lora}, "ref": {"decode": base, "prefill": base}},
                       reference="ref")
    assert out["lora"]["decode_ratio"] == pytest.approx(1.5)
    assert out["lora"]["prefill_ratio"] == pytest.approx(1.5)


def test_unpaired_measurements_are_refused():
    with pytest.raises(ValueError, match="paired"):
        speed_ratios({"base": {"decode": [1.0, 2.0], "prefill": [1.0, 2.0]},
                      "lora": {"decode": [1.0], "prefill": [1.0]}})


def test_every_model_goes_first_in_some_round():
    names = ["base", "lora", "grit"]
    orders = [rotation(names, r) for r in range(SpeedSettings(rounds=3).rounds)]
    assert {order[0] for order in orders} == set(names)
    assert all(sorted(order) == sorted(names) for order in orders)


@pytest.fixture(scope="module")
def tiny_base():
    # The same cached tiny-Llama GGUF that tests/export/conftest.py's tiny_export serves as its base
    # (that fixture is not visible from tests/evaluation; the adapter it also builds is not needed).
    params = ModelParams(source="tiny")
    files = resolve_base_model(params)
    return base_gguf(files, "F32"), chat_format(load_tokenizer(files, params))


def test_a_model_against_itself_runs_at_about_the_same_speed(tiny_base):
    path, chat = tiny_base
    # Two Llama instances of one file: the ratio is 1 up to machine noise. One thread each, since
    # with other jobs on the 2 cores a descheduled llama.cpp thread stalls the other at every
    # barrier, slowing single measurements a hundredfold at random.
    models = {name: LlamaCppModel(path, chat, n_ctx=256, n_threads=1) for name in ("base", "same")}
    # A long prompt too, so that prefill takes long enough to time.
    prompts = ["Hello there, how are you?", "Name three colours, then explain why the sky is blue. " * 8]
    settings = SpeedSettings(new_tokens=16, rounds=4)
    expected_ids = [tuple(models["base"].prompt_tokens(p)) for p in prompts] * settings.rounds
    try:
        rates = side_by_side(models, prompts, settings.new_tokens, settings.rounds)
        with pytest.raises(ValueError, match="exceed the context"):
            time_one(models["base"].llm, expected_ids[1], 256)
    finally:
        for model in models.values():
            model.close()
    pairs = settings.rounds * len(prompts)
    for name in models:
        assert rates[name]["new_tokens"] == [settings.new_tokens] * pairs     # no early stop at EOS
        assert rates[name]["prompt_ids"] == expected_ids                     # same ids, same order
        assert all(rate > 0 for rate in rates[name]["decode"] + rates[name]["prefill"])
    out = speed_ratios(rates)
    assert out["same"]["n"] == pairs
    assert 0.5 < out["same"]["decode_ratio"] < 2.0
    assert 0.5 < out["same"]["prefill_ratio"] < 2.0
