"""compare_all's judgement: Holm over the family, effects weighed by size and interval, and the
success-criteria table (on hand-built tables; the smoke run checks the store end to end)."""

from __future__ import annotations

from types import SimpleNamespace

from evaluation.compare_all import RunTables, criteria_rows, grit_rows, speed_table, summary_line, verdict
from export.config import ExportParams

MODELS = ["base", "peft_lora", "pure_grit"]


def _figure(value, low=None, high=None):
    return [SimpleNamespace(value=value, ci_low=low, ci_high=high)]


def _comparison(metric, variant, reference, delta, low, high, p, significant, seed=0, p_adjusted=None):
    return SimpleNamespace(metric=metric, variant=variant, reference=reference, delta=delta, ci_low=low, ci_high=high,
                           p_value=p, p_adjusted=p_adjusted if p_adjusted is not None else p, test="t",
                           significant=significant, n=150, seed=seed)


def _tables(comparisons, speeds=None, metrics=None) -> RunTables:
    figures = {("peft_lora", "aqi"): _figure(0.5), ("pure_grit", "aqi"): _figure(0.5017),
               ("peft_lora", "decline_probability"): _figure(0.6), ("pure_grit", "decline_probability"): _figure(0.2),
               ("peft_lora", "retention_accuracy"): _figure(0.8), ("pure_grit", "retention_accuracy"): _figure(0.65),
               ("peft_lora", "export_parity_merged_agreement"): _figure(1.0),
               ("peft_lora", "export_parity_merged_mean_kl"): _figure(0.001),
               ("pure_grit", "export_parity_merged_agreement"): _figure(0.9),
               ("pure_grit", "export_parity_merged_mean_kl"): _figure(0.001)} | (metrics or {})
    run = SimpleNamespace(id="r", params_json="{}")
    return RunTables(run, MODELS, figures, speeds or {}, comparisons,
                     export=ExportParams(min_agreement=0.95, max_mean_kl=0.02), controls={"pure_grit": "peft_lora"})


def test_a_significant_but_tiny_aqi_gain_does_not_outweigh_a_large_refusal_loss():
    tables = _tables([
        _comparison("aqi", "pure_grit", "peft_lora", 0.0017, 0.0005, 0.003, 0.001, True),
        _comparison("decline_probability", "pure_grit", "peft_lora", -0.40, -0.48, -0.32, 1e-9, True)])
    aqi, refusal = tables.differences
    assert verdict(tables, aqi) == "negligible difference"      # 0.34% of 0.5, below the 5% bound
    assert verdict(tables, refusal) == "GRIT worse"
    line = summary_line(tables)
    assert line.startswith("GRIT does not beat plain LoRA")
    assert "decline_probability -0.400 [-0.4800, -0.3200]" in line and "significant but negligible: aqi" in line


def test_the_summary_names_a_1_xb_finding_once_not_again_as_the_aqi_style_index():
    """The AQI-style index is a function of 1/XB: a significant separation gain is one finding."""
    metrics = {("peft_lora", "separation"): _figure(0.30), ("pure_grit", "separation"): _figure(0.36)}
    tables = _tables([
        _comparison("separation", "pure_grit", "peft_lora", 0.06, 0.03, 0.09, 1e-4, True),
        _comparison("aqi", "pure_grit", "peft_lora", 0.04, 0.02, 0.06, 1e-4, True)], metrics=metrics)
    line = summary_line(tables)
    assert line.startswith("GRIT beats plain LoRA where listed") and "separation +0.060" in line
    assert "aqi" not in line


def test_without_a_decisive_difference_the_summary_says_so():
    tables = _tables([_comparison("decline_probability", "pure_grit", "peft_lora", 0.08, -0.01, 0.17, 0.09, False)])
    line = summary_line(tables)
    assert line.startswith("GRIT does not beat plain LoRA") and "no difference both significant" in line


def test_several_seeds_are_judged_on_holm_adjusted_t_tests():
    rows = [_comparison(metric, "pure_grit", "peft_lora", delta, None, None, None, False, seed=seed)
            for seed, shift in enumerate((0.0, 0.01, -0.01))
            for metric, delta in (("decline_probability", 0.30 + shift), ("aqi", 0.001 + shift))]
    tables = _tables(rows)
    by_metric = {d.metric: d for d in tables.differences}
    assert all(d.n_seeds == 3 and d.p_adjusted >= d.p_value for d in by_metric.values())
    assert by_metric["decline_probability"].significant and not by_metric["aqi"].significant


def test_success_criteria_pass_and_fail_per_variant():
    speeds = {("peft_lora", "delta_speed_decode"): [SimpleNamespace(value=0.97)],
              ("pure_grit", "delta_speed_decode"): [SimpleNamespace(value=0.85)]}
    tables = _tables([_comparison("aqi", "peft_lora", "base", 0.01, 0.005, 0.02, 0.001, True),
                      _comparison("aqi", "pure_grit", "base", 0.02, -0.01, 0.05, 0.2, False),
                      _comparison("aqi", "pure_grit", "peft_lora", 0.0017, 0.0005, 0.003, 0.001, True)], speeds)
    rows = {row[0]: row[1:] for row in criteria_rows(tables)}
    assert rows["alignment improves over base: AQI-style up, significant"] == ["pass (+0.0100)", "FAIL (+0.0200)"]
    assert rows["GRIT beats its control: AQI-style up, significant"] == ["-", "pass (+0.0017)"]
    assert rows["decode speed >= 0.9x base (side by side)"] == ["pass (0.970)", "FAIL (0.850)"]
    assert rows["prefill speed >= 0.9x base (side by side)"] == ["n/a", "n/a"]
    assert rows["export parity (>= 95% agreement, <= 0.02 nats)"][0].startswith("pass (100%")
    assert rows["export parity (>= 95% agreement, <= 0.02 nats)"][1].startswith("FAIL (90%")
    assert rows["knowledge retention > 0.70"] == ["pass (0.800)", "FAIL (0.650)"]


def test_the_speed_criteria_judge_against_the_base_in_the_variants_format_where_it_was_timed():
    """A merged Q8_0 variant at 0.85x the Q4_1 base as served but 0.99x the base in Q8_0 passes:
    the format is the serving setting's cost, not the adapter's; the speed table keeps both."""
    speeds = {(v, metric): [SimpleNamespace(value=value)] for v, metric, value in (
        ("peft_lora", "delta_speed_decode", 0.85), ("peft_lora", "delta_speed_decode_same_format", 0.99),
        ("pure_grit", "delta_speed_decode", 0.80), ("pure_grit", "delta_speed_decode_same_format", 0.88),
        ("base", "delta_speed_decode_same_format", 1.16))}
    tables = _tables([_comparison("aqi", "pure_grit", "peft_lora", 0.0017, 0.0005, 0.003, 0.001, True)], speeds)
    rows = {row[0]: row[1:] for row in criteria_rows(tables)}
    assert rows["decode speed >= 0.9x base in the variants' file format (side by side)"] == \
        ["pass (0.990)", "FAIL (0.880)"]
    assert "decode speed >= 0.9x base (side by side)" not in rows
    table = {row[0]: row[1:] for row in speed_table(tables)}
    assert table["decode speed / base (side by side)"][1:] == ["0.8500", "0.8000"]
    assert table["decode speed / base in the variants' file format (side by side)"] == ["1.1600", "0.9900", "0.8800"]


def test_a_declared_pair_across_engines_has_its_own_table_and_does_not_decide_the_headline():
    """eval.comparisons (pure GRIT vs the Unsloth baseline) is reported beside the same-engine
    pairs, never as GRIT-vs-control: GRIT and the engine differ together there."""
    tables = _tables([
        _comparison("aqi", "pure_grit", "peft_lora", 0.001, -0.01, 0.012, 0.6, False),
        _comparison("aqi", "pure_grit", "baseline_lora", -0.2, -0.25, -0.15, 1e-6, True)])
    assert [row[0] for row in grit_rows(tables)] == ["pure_grit vs peft_lora"]
    across = grit_rows(tables, control_pairs=False)
    assert [row[0] for row in across] == ["pure_grit vs baseline_lora"] and across[0][-1] == "GRIT worse"
    assert "baseline_lora" not in summary_line(tables) and "no difference both significant" in summary_line(tables)
    rows = {row[0]: row[1:] for row in criteria_rows(tables)}
    assert rows["GRIT beats its control: AQI-style up, significant"] == ["-", "FAIL (+0.0010)"]   # vs peft_lora
