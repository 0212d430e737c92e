"""The study's headline with a peer among the controls: GRIT's findings against plain LoRA and
against a peer (riemannian_lora) are counted apart, never added up as "better than LoRA"."""

from __future__ import annotations

from evaluation.stats import Interval
from evaluation.study import PairedTest
from evaluation.study_report import (
    control_names,
    plot_differences,
    significance_block,
    study_headline,
    study_verdict,
)
from pipelines.params import load_params


def _test(method: str, control: str, delta: float, p: float, steps: int = 96) -> PairedTest:
    """A test-loss row (smallest effect: 1% of the control's 0.33): delta +-0.001 for its intervals."""
    return PairedTest(steps, method, control, "test_loss", Interval(delta, delta - 0.001, delta + 0.001, 10), p, p,
                      reference=0.33, equivalence=Interval(delta, delta - 0.0008, delta + 0.0008, 10))


# grit_paper: better than the peer, equivalent to LoRA; pure_grit: worse than LoRA, inconclusive against the peer
TESTS = [_test("grit_paper", "riemannian_lora", -0.0157, 0.005), _test("grit_paper", "peft_lora", 0.0001, 0.9),
         _test("pure_grit", "peft_lora", 0.0134, 0.005), _test("pure_grit", "riemannian_lora", -0.0030, 0.3)]
NAMES = {"peft_lora": "LoRA", "riemannian_lora": "Riemannian-preconditioned LoRA (`riemannian_lora`)"}


def test_a_win_over_the_peer_is_not_counted_as_a_win_over_lora():
    sentence = study_headline(TESTS, ["grit_paper", "pure_grit"], NAMES)
    assert sentence.startswith("No: GRIT is worse than LoRA in 1 and better in none of 2 paired tests; "
                               "equivalent in 1 and inconclusive in 0; against Riemannian-preconditioned LoRA "
                               "(`riemannian_lora`): better in 1 and worse in none of 2, equivalent in 0 and "
                               "inconclusive in 1 (")
    verdict = study_verdict(TESTS, ["grit_paper", "pure_grit"], NAMES)
    assert "Better: loss on the held-out test split (never read by selection) (grit_paper vs riemannian_lora" in verdict
    assert "worse: loss on the held-out test split (never read by selection) (pure_grit vs peft_lora" in verdict


def test_with_lora_alone_the_headline_is_the_one_control_sentence():
    only_lora = [t for t in TESTS if t.control == "peft_lora"]
    sentence = study_headline(only_lora, ["grit_paper", "pure_grit"], {"peft_lora": "LoRA"})
    assert sentence.startswith("No: GRIT is worse than LoRA in 1 and better in none of 2 paired tests; equivalent in "
                               "1 and inconclusive in 0 (paired over seeds")
    assert "against" not in sentence


def test_the_study_profile_names_plain_lora_first_and_the_peer_by_its_preconditioner():
    params = load_params()
    assert list(control_names(params, ["riemannian_lora", "peft_lora"]).items()) == [
        ("peft_lora", "LoRA"), ("riemannian_lora", "Riemannian-preconditioned LoRA (`riemannian_lora`)")]
    # two plain controls: each by its name
    assert control_names(params, ["peft_lora", "baseline_lora"]) == {"peft_lora": "LoRA (`peft_lora`)",
                                                                     "baseline_lora": "LoRA (`baseline_lora`)"}


def test_the_readme_significance_table_names_the_control_when_there_are_two(tmp_path, monkeypatch):
    intro, table, _ = significance_block(TESTS, ["test_loss"], [96])
    assert "`peft_lora`, `riemannian_lora`" in intro
    assert "better: grit_paper vs riemannian_lora -0.0157; worse: pure_grit vs peft_lora +0.0134" in table
    _, alone, _ = significance_block([t for t in TESTS if t.control == "peft_lora"], ["test_loss"], [96])
    assert "worse: pure_grit +0.0134" in alone and " vs " not in alone
    # the picture: a legend entry per method and per control, a marker per control in the panel
    import evaluation.study_report as report

    seen = {}
    save = report._save
    monkeypatch.setattr(report, "_save", lambda plt, figure, path: seen.setdefault("figure", figure) and
                        save(plt, figure, path))
    assert plot_differences(TESTS, [96], tmp_path / "differences.png").is_file()
    figure = seen["figure"]
    legend = figure.legends[0] if figure.legends else figure.axes[0].get_legend()
    panel = figure.axes[0]
    assert [t.get_text() for t in legend.get_texts()] == [
        "grit_paper", "pure_grit", "vs riemannian_lora", "vs peft_lora"]
    assert len(panel.collections) >= 4     # four (method, control) series of points
