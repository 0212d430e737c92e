"""The README's result blocks, rendered from the committed ``metrics/study.json`` (the fair
study's headline) and ``metrics/eval.json`` (the default run), and docs/method.md's probe table
from ``metrics/probes.json``.

The README shows the default run's figures; writing them by hand lets them go stale. This renders
the same tables ``compare_all`` prints (value [interval], Δ vs base, GRIT vs its same-engine
control, the plain summary sentence) from the metrics file the ``evaluate`` stage writes, between
two marker lines of README.md; a test fails when the README and the metrics disagree.

    python -m evaluation.readme_results            # rewrite the block
    python -m evaluation.readme_results --check    # exit 1 when the block is stale
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import yaml

from evaluation.compare_all import (
    RunTables,
    criteria_rows,
    grit_rows,
    legend,
    markdown,
    quality_table,
    recorded_section,
    speed_table,
    summary_line,
)
from evaluation.config import EvalParams
from evaluation.metrics import model_metrics
from export.config import ExportParams, ServeParams

NOT_MODELS = ("comparisons", "across_seeds", "decline_probability_vs_judge")

BEGIN = "<!-- results:begin (python -m evaluation.readme_results) -->"
END = "<!-- results:end -->"
STUDY_BEGIN = "<!-- study:begin (python -m evaluation.readme_results) -->"
STUDY_END = "<!-- study:end -->"
PROBE_BEGIN = "<!-- probe:begin (python -m evaluation.readme_results) -->"
PROBE_END = "<!-- probe:end -->"


def tables_from_metrics(evaluation: dict, run_label: str, params_json: str = "{}") -> RunTables:
    """A :class:`RunTables` of the primary seed from ``metrics/eval.json``'s content."""
    models = [name for name in evaluation if name not in NOT_MODELS]
    metrics = {
        (model, metric): [SimpleNamespace(value=figure["value"], ci_low=figure["ci"][0], ci_high=figure["ci"][1])]
        for model in models for metric, figure in evaluation[model].items()
        if isinstance(figure, dict) and "ci" in figure
    }
    params = json.loads(params_json)
    served = recorded_section(params.get("serve"), ServeParams).weights      # the form eval.json's parity is of
    metrics |= {(model, f"export_parity_{served}_{name}"):
                [SimpleNamespace(value=evaluation[model]["export_parity"][name], ci_low=None, ci_high=None)]
                for model in models if "export_parity" in evaluation[model] for name in ("agreement", "mean_kl")}
    speeds = {(model, metric): [SimpleNamespace(value=value)]
              for model in models for metric, value in evaluation[model].get("speed", {}).items()}
    seed = min((c["seed"] for c in evaluation.get("comparisons", [])), default=None)
    comparisons = [SimpleNamespace(**c) for c in evaluation.get("comparisons", []) if c["seed"] == seed
                   and c["metric"] in {m.name for m in model_metrics()}]
    return RunTables(SimpleNamespace(id=run_label, params_json=params_json), models, metrics, speeds, comparisons,
                     recorded_section(params.get("eval"), EvalParams),
                     recorded_section(params.get("export"), ExportParams),
                     recorded_section(params.get("serve"), ServeParams))


def results_block(evaluation: dict, run_label: str, params_json: str = "{}") -> str:
    tables = tables_from_metrics(evaluation, run_label, params_json)
    quality = markdown(["metric", *tables.models], quality_table(tables))
    speed = markdown(["speed", *tables.models], speed_table(tables))
    criteria = markdown(["success criterion", *(m for m in tables.models if m != "base")], criteria_rows(tables))
    grit = markdown(["pair", "metric", "delta", "95% CI", "test (raw p, Holm p)", "verdict"], grit_rows(tables))
    return (f"{quality}\n\n{legend(tables)}\n\n{speed}\n\n{criteria}\n\n{grit}\n\n"
            f"**{summary_line(tables)}**")


def probe_block(probes: dict) -> str:
    """docs/method.md's table of what the probe measured, from ``metrics/probes.json``: each GRIT
    variant's verdict and every check's finding, as the probe stage wrote them."""
    variants = probes["variants"]
    names = list(variants)
    checks = list(dict.fromkeys(check for v in names for check in variants[v]["checks"]))
    header = ["", *(f"{v} (vs {variants[v]['trajectory_control']})" for v in names)]
    rows = [["verdict", *(f"**{variants[v]['verdict']}**" for v in names)]]
    rows += [[check.replace("_", " "), *(variants[v]["checks"].get(check, "n/a").replace("|", "\\|") for v in names)]
             for check in checks]
    return (f"`dvc repro probe` ({probes['steps']} steps per arm; rendered from the committed "
            f"`metrics/probes.json`):\n\n{markdown(header, rows)}")


def with_block(readme: str, block: str, begin: str = BEGIN, end: str = END) -> str:
    if begin not in readme or end not in readme:
        raise ValueError(f"README.md has no {begin!r} ... {end!r} markers")
    head, rest = readme.split(begin, 1)
    return f"{head}{begin}\n{block}\n{end}{rest.split(end, 1)[1]}"


def with_study_block(readme: str, study_metrics: Path) -> str:
    """The study's headline block, from ``metrics/study.json`` (a not-yet-run note without it)."""
    from evaluation.study_report import readme_block

    study = json.loads(study_metrics.read_text()) if study_metrics.is_file() else {}
    return with_block(readme, readme_block(study), STUDY_BEGIN, STUDY_END)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evaluation.readme_results", description=__doc__.splitlines()[0])
    parser.add_argument("--readme", type=Path, default=Path("README.md"))
    parser.add_argument("--metrics", type=Path, default=Path("metrics/eval.json"))
    parser.add_argument("--study", type=Path, default=Path("metrics/study.json"))
    parser.add_argument("--method", type=Path, default=Path("docs/method.md"), help="holds the probe block")
    parser.add_argument("--probes", type=Path, default=Path("metrics/probes.json"))
    parser.add_argument("--params", type=Path, default=Path("params.yaml"),
                        help="its eval and export thresholds judge the success criteria")
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    readme = args.readme.read_text()
    params = yaml.safe_load(args.params.read_text()) if args.params.is_file() else {}
    sections = json.dumps({k: (params or {}).get(k, {}) for k in ("eval", "export", "serve")})
    wanted = with_block(readme, results_block(json.loads(args.metrics.read_text()), f"recorded in `{args.metrics}`",
                                              sections))
    wanted = with_study_block(wanted, args.study)
    method = args.method.read_text() if args.method.is_file() else None
    method_wanted = (with_block(method, probe_block(json.loads(args.probes.read_text())), PROBE_BEGIN, PROBE_END)
                     if method is not None and args.probes.is_file() else method)
    if args.check:
        if wanted != readme or method_wanted != method:
            print(f"{args.readme}'s or {args.method}'s result blocks differ from the committed metrics; "
                  "run python -m evaluation.readme_results", file=sys.stderr)
            return 1
        return 0
    args.readme.write_text(wanted)
    if method_wanted is not None:
        args.method.write_text(method_wanted)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
