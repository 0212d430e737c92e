"""Side-by-side served speed: the paired-ratio arithmetic, the rotation, the reference in the
variants' file format, and a real tiny GGUF."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from evaluation.speed import (
    SAME_FORMAT,
    SpeedSettings,
    rotation,
    served_speed,
    side_by_side,
    speed_figures,
    speed_ratios,
    time_one,
)
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


def test_speed_figures_give_ratios_to_the_base_as_served_and_to_the_base_in_the_variants_format():
    """A merged variant decodes as fast as the base in its own format (1.0) but at 0.8x the base
    as served (a smaller file format): the figures keep both, and the base's own ratio to the
    reference says what its format gains; the reference is timed, not reported as a model."""
    rates = {"base": {"decode": [50.0, 60.0], "prefill": [100.0, 100.0]},
             "merged": {"decode": [40.0, 48.0], "prefill": [150.0, 150.0]},
             SAME_FORMAT: {"decode": [40.0, 48.0], "prefill": [150.0, 150.0]}}
    out = speed_figures(rates, ["base", "merged"], SAME_FORMAT)
    assert set(out) == {"base", "merged"}
    assert out["merged"]["delta_speed_decode"] == (pytest.approx(0.8), 2)
    assert out["merged"]["delta_speed_decode_same_format"] == (pytest.approx(1.0), 2)
    assert out["merged"]["delta_speed_prefill_same_format"] == (pytest.approx(1.0), 2)
    assert out["base"]["delta_speed_decode_same_format"] == (pytest.approx(1.25), 2)
    assert "delta_speed_decode" not in out["base"] and out["base"]["decode_tokens_per_second"] == (55.0, 2)
    without = speed_figures({k: rates[k] for k in ("base", "merged")}, ["base", "merged"])
    assert not any(metric.endswith("_same_format") for figures in without.values() for metric in figures)
    assert without["merged"]["delta_speed_decode"] == out["merged"]["delta_speed_decode"]


def test_served_speed_times_the_speed_reference_of_the_serve_manifest(tiny_base, tmp_path, monkeypatch):
    """Real llama.cpp on the tiny model: a variant served merged in Q8_0 against a base served in
    F32 is also timed against the base in Q8_0 (``export.gguf.in_format``), which the serve stage
    names in its manifest."""
    from core.files import sha256_file
    from export.gguf import in_format, quantize
    from export.served import ServeManifest

    monkeypatch.setenv("GRIT_CACHE_DIR", str(tmp_path / "cache"))
    path, chat = tiny_base
    merged = quantize(path, tmp_path / "merged-q8.gguf", "Q8_0")
    served = {"chat_family": chat.family, "system": chat.default_system}
    manifest = ServeManifest.model_validate({
        "backend": "llama.cpp", "weights": "merged",
        "models": {"base": {**served, "base_gguf": str(path), "adapter_gguf": None, "weights": "base"},
                   "v": {**served, "base_gguf": str(path), "merged_gguf": str(merged), "weights": "merged"}},
        "speed_reference": {"gguf": str(in_format(path, sha256_file(path), "Q8_0")), "quantization": "Q8_0"}})
    settings = SimpleNamespace(speed_prompts=2, speed_new_tokens=4, speed_rounds=2)
    out = served_speed(manifest, ["base", "v"], settings)
    assert set(out) == {"base", "v"}
    assert set(out["v"]) == {"decode_tokens_per_second", "prefill_tokens_per_second", "delta_speed_decode",
                             "delta_speed_prefill", "delta_speed_decode_same_format",
                             "delta_speed_prefill_same_format"}
    assert all(value > 0 and n == 4 for figures in out.values() for value, n in figures.values())
    assert "delta_speed_decode_same_format" in out["base"]
    without = manifest.model_copy(update={"speed_reference": None})
    assert "delta_speed_decode_same_format" not in served_speed(without, ["base", "v"], settings)["v"]
