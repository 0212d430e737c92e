"""``python -m evaluation.compare_all``: the comparison of one run, from the results store.

Rows are metrics, columns the base and each variant; a cell holds the value with its interval
and, for variants, the paired delta against the base (``*``: significant, test named in the
notes). A second table pairs every GRIT variant with its same-engine control and says plainly
whether GRIT beat plain LoRA. Writes ``reports/compare.md`` and one PNG per metric; ``--csv``
exports every figure. Exit 2 with one line when the store is missing or holds no complete run.

    python -m evaluation.compare_all [--run RUN_ID] [--csv reports/compare.csv] [--store URL]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from db.models import Comparison, EvalMetric, Run, SpeedMetric
from db.store import open_store
from pipelines.errors import UserError

QUALITY = [("aqi", "AQI (higher: harmful and benign better separated)", True),
           ("chi", "Calinski-Harabasz (raw)", True), ("xb", "Xie-Beni (raw, lower is better)", False),
           ("refusal_rate", "refusal rate on harmful prompts", True),
           ("overrefusal_rate", "over-refusal on edgy-benign prompts (lower is better)", False),
           ("retention_accuracy", "knowledge retention (fact pairs)", True)]
SPEED = [("decode_tokens_per_second", "decode tokens/s"), ("prefill_tokens_per_second", "prefill tokens/s"),
         ("train_seconds", "training time (s)"), ("tokens_per_second", "training tokens/s"),
         ("peak_rss_mib", "training peak RSS (MiB)")]
REPORTS = Path("reports")


@dataclass(frozen=True)
class RunTables:
    run: Run
    models: list[str]
    metrics: dict[tuple[str, str], EvalMetric]        # (model, metric)
    speeds: dict[tuple[str, str], SpeedMetric]
    comparisons: list[Comparison]


def default_store_url(root: Path) -> str:
    from pipelines.params import load_params

    params = root / "params.yaml"
    return load_params(params).store.url if params.is_file() else "sqlite:///outputs/centralized.db"


def load_run(url: str, root: Path, run_id: str | None) -> RunTables:
    if url.startswith("sqlite:///") and not (root / url.removeprefix("sqlite:///")).is_file():
        raise UserError(f"no results store at {url.removeprefix('sqlite:///')}; run `make run` first")
    store = open_store(url, root)
    with store.reader() as session:
        if run_id:
            run = session.get(Run, run_id)
            if run is None:
                raise UserError(f"no run {run_id!r} in the store; runs: "
                                + ", ".join(r.id for r in session.scalars(select(Run))))
        else:
            run = session.scalars(select(Run).where(Run.status == "complete")
                                  .order_by(Run.finished_at.desc())).first()
            if run is None:
                raise UserError("the results store holds no complete run; finish `make run` (dvc repro) first")
        metrics = {(m.variant, m.metric): m for m in session.scalars(select(EvalMetric).where(EvalMetric.run_id == run.id))}
        speeds = {(s.variant, s.metric): s for s in session.scalars(select(SpeedMetric).where(SpeedMetric.run_id == run.id))}
        comparisons = list(session.scalars(select(Comparison).where(Comparison.run_id == run.id)))
        session.expunge_all()
    if not any(metric == "aqi" for _, metric in metrics):
        raise UserError(f"run {run.id} has no evaluation results; run `dvc repro evaluate`")
    variants = list(json.loads(run.params_json)["variants"])
    return RunTables(run, ["base", *variants], metrics, speeds, comparisons)


def _number(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"


def cell(tables: RunTables, model: str, metric: str) -> str:
    row = tables.metrics.get((model, metric))
    if row is None:
        return "n/a"
    text = f"{_number(row.value)} [{_number(row.ci_low)}, {_number(row.ci_high)}]"
    delta = next((c for c in tables.comparisons if c.variant == model and c.reference == "base" and c.metric == metric),
                 None)
    if delta is not None:
        text += f" Δ {delta.delta:+.4f}{'*' if delta.significant else ''}"
    return text


def quality_table(tables: RunTables) -> list[list[str]]:
    return [[label, *(cell(tables, model, metric) for model in tables.models)] for metric, label, _ in QUALITY]


def speed_table(tables: RunTables) -> list[list[str]]:
    rows = []
    for metric, label in SPEED:
        values = [tables.speeds.get((model, metric)) for model in tables.models]
        if any(values):
            rows.append([label, *(_number(v.value) if v else "n/a" for v in values)])
    return rows


def grit_rows(tables: RunTables) -> list[list[str]]:
    rows = []
    for c in tables.comparisons:
        if c.reference == "base":
            continue
        better = QUALITY_DIRECTION[c.metric]
        verdict = ("GRIT better" if (c.delta > 0) == better else "GRIT worse") if c.significant else "no significant difference"
        p = f"p={c.p_value:.3g}" if c.p_value is not None else "CI"
        rows.append([f"{c.variant} vs {c.reference}", c.metric, f"{c.delta:+.4f}",
                     f"[{_number(c.ci_low)}, {_number(c.ci_high)}]", f"{c.test} ({p})", verdict])
    return rows


QUALITY_DIRECTION = {metric: higher for metric, _, higher in QUALITY}


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def summary_line(tables: RunTables) -> str:
    """One plain sentence: where GRIT is significantly better, worse, or not different."""
    rows = grit_rows(tables)
    if not rows:
        return "No GRIT variant with a same-engine control in this run."
    def metrics(verdict: str) -> str:
        return ", ".join(f"{r[1]} {r[2]} ({r[0].split(' vs ')[0]})" for r in rows if r[5] == verdict)
    better, worse, same = metrics("GRIT better"), metrics("GRIT worse"), metrics("no significant difference")
    parts = [f"better on {better}" if better else "better on no metric",
             f"worse on {worse}" if worse else None, f"no significant difference on {same}" if same else None]
    head = "GRIT beats plain LoRA only where marked" if better else "GRIT does not beat plain LoRA"
    return f"{head} (run {tables.run.id}): " + "; ".join(p for p in parts if p) + "."


def report(tables: RunTables) -> str:
    quality = markdown(["metric", *tables.models], quality_table(tables))
    speed = markdown(["speed", *tables.models], speed_table(tables))
    grit = markdown(["pair", "metric", "delta", "95% CI", "test", "verdict"], grit_rows(tables))
    return (f"# Comparison of run {tables.run.id} ({tables.run.profile} profile, {tables.run.device})\n\n"
            f"{quality}\n\nCells: value [95% bootstrap CI] and Δ vs base; `*` = significant (AQI: paired "
            "bootstrap CI excludes 0; rates: exact McNemar p < 0.05).\n\n"
            f"{speed}\n\n## GRIT vs its same-engine control\n\n{grit}\n\n**{summary_line(tables)}**\n")


def plots(tables: RunTables, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for metric, label, _ in QUALITY:
        rows = [(m, tables.metrics.get((m, metric))) for m in tables.models]
        rows = [(m, r) for m, r in rows if r is not None and r.ci_low is not None]
        if not rows:
            continue
        figure, axis = plt.subplots(figsize=(1.6 * len(rows) + 2, 3.2))
        values = [r.value for _, r in rows]
        # a percentile interval need not contain the point estimate (biased statistics such as CHI)
        errors = [[max(0.0, r.value - r.ci_low) for _, r in rows], [max(0.0, r.ci_high - r.value) for _, r in rows]]
        axis.bar([m for m, _ in rows], values, yerr=errors, capsize=4,
                 color=["grey" if m == "base" else "tab:blue" for m, _ in rows])
        axis.set_title(f"{label} (95% CI)", fontsize=10)
        axis.tick_params(axis="x", labelsize=8)
        figure.tight_layout()
        path = folder / f"compare_{metric}.png"
        figure.savefig(path, dpi=100)
        plt.close(figure)
        written.append(path)
    return written


def write_csv(tables: RunTables, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["run", "kind", "model", "metric", "value", "ci_low", "ci_high", "n", "reference", "p_value",
                         "test", "significant"])
        for (model, metric), m in sorted(tables.metrics.items()):
            writer.writerow([tables.run.id, "figure", model, metric, m.value, m.ci_low, m.ci_high, m.n, "", "", "", ""])
        for (model, metric), s in sorted(tables.speeds.items()):
            writer.writerow([tables.run.id, f"speed:{s.backend}", model, metric, s.value, "", "", s.n, "", "", "", ""])
        for c in tables.comparisons:
            writer.writerow([tables.run.id, "comparison", c.variant, c.metric, c.delta, c.ci_low, c.ci_high, c.n,
                             c.reference, c.p_value, c.test, c.significant])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evaluation.compare_all", description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="run id (default: the latest complete run)")
    parser.add_argument("--csv", type=Path, help="also write every figure to this CSV file")
    parser.add_argument("--store", help="SQLAlchemy URL (default: store.url of params.yaml)")
    args = parser.parse_args(argv)
    root = Path.cwd()
    try:
        tables = load_run(args.store or default_store_url(root), root, args.run)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    text = report(tables)
    print(text)
    REPORTS.mkdir(exist_ok=True)
    (root / REPORTS / "compare.md").write_text(text)
    written = plots(tables, root / REPORTS)
    if args.csv:
        write_csv(tables, args.csv)
    print(f"wrote {REPORTS / 'compare.md'} and {len(written)} plots" + (f", {args.csv}" if args.csv else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
