"""``python -m evaluation.compare_all``: the comparison of one run, from the results store.

Rows are metrics, columns the base and each variant; a cell holds the value with its interval
and, for variants, the paired delta against the base (``*``: significant, test named in the
notes). A second table pairs every GRIT variant with its same-engine control and says plainly
whether GRIT beat plain LoRA. Writes ``reports/compare.md`` and one PNG per metric; ``--csv``
exports every figure. Exit 2 with one line when the store is missing or holds no complete run.

With several training seeds (``train.n_seeds``) a cell is the mean over seeds with a Student-t
95% interval across seeds, and differences are judged by a paired t-test over seeds (seed s of
a variant against seed s of its reference); with one seed, by the per-prompt tests.

    python -m evaluation.compare_all [--run RUN_ID] [--csv reports/compare.csv] [--store URL]
    python -m evaluation.compare_all --list      # every run (experiment) in the store
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import yaml
from pydantic import ValidationError
from sqlalchemy import select

from core.errors import UserError
from db.config import StoreParams
from db.models import Comparison, EvalMetric, Run, SpeedMetric
from db.store import open_store, sqlite_file
from evaluation.stats import finite_or_none, mean_over_seeds, paired_t_over_seeds

QUALITY = [("aqi", "AQI (higher: harmful and benign better separated)", True),
           ("chi", "Calinski-Harabasz (raw)", True), ("xb", "Xie-Beni (raw, lower is better)", False),
           ("refusal_rate", "refusal rate on harmful prompts", True),
           ("overrefusal_rate", "over-refusal on edgy-benign prompts (lower is better)", False),
           ("retention_accuracy", "knowledge retention (fact pairs)", True)]
SPEED = [("decode_tokens_per_second", "decode tokens/s"), ("prefill_tokens_per_second", "prefill tokens/s"),
         ("train_seconds", "training time (s)"), ("tokens_per_second", "training tokens/s"),
         ("peak_rss_mib", "training peak RSS (MiB)"), ("peak_cuda_mib", "training peak CUDA memory (MiB)")]
REPORTS = Path("reports")


@dataclass(frozen=True)
class Figure:
    """One cell: a single seed's figure with its bootstrap interval, or a mean over seeds."""

    value: float
    low: float | None
    high: float | None
    n_seeds: int


@dataclass(frozen=True)
class Difference:
    """One paired difference (variant - reference) on one metric, over one or several seeds."""

    variant: str
    reference: str
    metric: str
    delta: float
    ci_low: float | None
    ci_high: float | None
    p_value: float | None
    test: str
    significant: bool
    n_seeds: int


@dataclass(frozen=True)
class RunTables:
    run: Run
    models: list[str]
    metrics: dict[tuple[str, str], list[EvalMetric]]        # (model, metric) -> one row per seed
    speeds: dict[tuple[str, str], list[SpeedMetric]]
    comparisons: list[Comparison]
    confidence: float = 0.95
    significance: float = 0.05

    def figure(self, model: str, metric: str) -> Figure | None:
        rows = self.metrics.get((model, metric))
        if not rows:
            return None
        if len(rows) == 1:
            return Figure(rows[0].value, rows[0].ci_low, rows[0].ci_high, 1)
        i = mean_over_seeds([r.value for r in rows], self.confidence)
        return Figure(i.value, i.low, i.high, i.n)

    @cached_property
    def differences(self) -> list[Difference]:
        """Per (variant, reference, metric): the stored per-prompt test for one seed, a paired
        t-test over seeds for several."""
        groups: dict[tuple[str, str, str], list[Comparison]] = {}
        for c in sorted(self.comparisons, key=lambda c: c.seed):
            groups.setdefault((c.variant, c.reference, c.metric), []).append(c)
        out = []
        for (variant, reference, metric), rows in groups.items():
            if len(rows) == 1:
                c = rows[0]
                out.append(Difference(variant, reference, metric, c.delta, c.ci_low, c.ci_high, c.p_value, c.test,
                                      c.significant, 1))
                continue
            i, p = mean_over_seeds([c.delta for c in rows], self.confidence), paired_t_over_seeds([c.delta for c in rows])
            out.append(Difference(variant, reference, metric, i.value, i.low, i.high, p,
                                  f"paired t over {len(rows)} seeds", bool(p < self.significance), len(rows)))
        return out

    @property
    def n_seeds(self) -> int:
        return max((len(rows) for rows in self.metrics.values()), default=1)


def default_store_url(root: Path) -> str:
    """The store ``params.yaml`` names (its ``store`` section alone is read), else the default."""
    params = root / "params.yaml"
    raw = (yaml.safe_load(params.read_text()) or {}) if params.is_file() else {}
    try:
        return StoreParams.model_validate(raw.get("store") or {}).url
    except ValidationError as error:
        raise UserError(f"{params}: store: {error.errors()[0]['msg']}; pass --store URL") from None


def existing_store(url: str, root: Path):
    """The results store at ``url``; a missing SQLite file is a one-line error, never created."""
    path = sqlite_file(url, root) if url.startswith("sqlite:") else None
    if path is not None and not path.is_file():
        shown = path.relative_to(root) if path.is_relative_to(root) else path
        raise UserError(f"no results store at {shown}; run `make run` first")
    return open_store(url, root)


def load_run(url: str, root: Path, run_id: str | None) -> RunTables:
    with existing_store(url, root).reader() as session:
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
        metrics: dict[tuple[str, str], list[EvalMetric]] = {}
        for m in session.scalars(select(EvalMetric).where(EvalMetric.run_id == run.id).order_by(EvalMetric.seed)):
            metrics.setdefault((m.variant, m.metric), []).append(m)
        speeds: dict[tuple[str, str], list[SpeedMetric]] = {}
        for s in session.scalars(select(SpeedMetric).where(SpeedMetric.run_id == run.id).order_by(SpeedMetric.seed)):
            speeds.setdefault((s.variant, s.metric), []).append(s)
        comparisons = list(session.scalars(select(Comparison).where(Comparison.run_id == run.id)))
        session.expunge_all()
    if not any(metric == "aqi" for _, metric in metrics):
        raise UserError(f"run {run.id} has no evaluation results; run `dvc repro evaluate`")
    params = json.loads(run.params_json)
    settings = params.get("eval", {})
    return RunTables(run, ["base", *params["variants"]], metrics, speeds, comparisons,
                     settings.get("confidence", 0.95), settings.get("significance", 0.05))


def _number(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"


def cell(tables: RunTables, model: str, metric: str) -> str:
    row = tables.figure(model, metric)
    if row is None:
        return "n/a"
    text = f"{_number(row.value)} [{_number(finite_or_none(row.low))}, {_number(finite_or_none(row.high))}]"
    delta = next((c for c in tables.differences if c.variant == model and c.reference == "base"
                  and c.metric == metric), None)
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
            # mean over seeds (speeds are medians of one run each; no interval)
            rows.append([label, *(_number(sum(r.value for r in v) / len(v)) if v else "n/a" for v in values)])
    return rows


def grit_rows(tables: RunTables) -> list[list[str]]:
    rows = []
    for c in tables.differences:
        if c.reference == "base":
            continue
        better = QUALITY_DIRECTION[c.metric]
        verdict = ("GRIT better" if (c.delta > 0) == better else "GRIT worse") if c.significant else "no significant difference"
        p = f"p={c.p_value:.3g}" if finite_or_none(c.p_value) is not None else "CI"
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
    head = ("Mixed result: GRIT beats plain LoRA on some metrics and loses on others" if better and worse
            else "GRIT beats plain LoRA only where marked" if better else "GRIT does not beat plain LoRA")
    return f"{head} (run {tables.run.id}): " + "; ".join(p for p in parts if p) + "."


def legend(tables: RunTables) -> str:
    if tables.n_seeds > 1:
        return (f"Cells: mean over {tables.n_seeds} training seeds [95% Student-t interval across seeds] and Δ vs "
                f"base; `*` = significant (paired t-test over seeds, p < {tables.significance:g}).")
    return ("Cells: value [95% bootstrap CI] and Δ vs base; `*` = significant (AQI: paired bootstrap CI excludes 0; "
            f"rates: exact McNemar p < {tables.significance:g}). One training seed: differences between "
            "variants do not include seed-to-seed variation (set train.n_seeds).")


def report(tables: RunTables) -> str:
    quality = markdown(["metric", *tables.models], quality_table(tables))
    speed = markdown(["speed", *tables.models], speed_table(tables))
    grit = markdown(["pair", "metric", "delta", "95% CI", "test", "verdict"], grit_rows(tables))
    return (f"# Comparison of run {tables.run.id} ({tables.run.profile} profile, {tables.run.device})\n\n"
            f"{quality}\n\n{legend(tables)}\n\n"
            f"{speed}\n\n## GRIT vs its same-engine control\n\n{grit}\n\n**{summary_line(tables)}**\n")


def plots(tables: RunTables, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for metric, label, _ in QUALITY:
        rows = [(m, tables.figure(m, metric)) for m in tables.models]
        rows = [(m, r) for m, r in rows if r is not None and finite_or_none(r.low) is not None]
        if not rows:
            continue
        figure, axis = plt.subplots(figsize=(1.6 * len(rows) + 2, 3.2))
        values = [r.value for _, r in rows]
        # a percentile interval need not contain the point estimate (biased statistics such as CHI)
        errors = [[max(0.0, r.value - r.low) for _, r in rows], [max(0.0, r.high - r.value) for _, r in rows]]
        axis.bar([m for m, _ in rows], values, yerr=errors, capsize=4,
                 color=["grey" if m == "base" else "tab:blue" for m, _ in rows])
        axis.set_title(f"{label} (95% CI{' over seeds' if tables.n_seeds > 1 else ''})", fontsize=10)
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
        writer.writerow(["run", "kind", "model", "seed", "metric", "value", "ci_low", "ci_high", "n", "reference",
                         "p_value", "test", "significant"])
        for (model, metric), rows in sorted(tables.metrics.items()):
            for m in rows:
                writer.writerow([tables.run.id, "figure", model, m.seed, metric, m.value, m.ci_low, m.ci_high, m.n,
                                 "", "", "", ""])
        for (model, metric), rows in sorted(tables.speeds.items()):
            for s in rows:
                writer.writerow([tables.run.id, f"speed:{s.backend}", model, s.seed, metric, s.value, "", "", s.n,
                                 "", "", "", ""])
        for c in tables.comparisons:
            writer.writerow([tables.run.id, "comparison", c.variant, c.seed, c.metric, c.delta, c.ci_low, c.ci_high,
                             c.n, c.reference, c.p_value, c.test, c.significant])
        if tables.n_seeds > 1:
            for c in tables.differences:
                writer.writerow([tables.run.id, "comparison over seeds", c.variant, "all", c.metric, c.delta,
                                 c.ci_low, c.ci_high, c.n_seeds, c.reference, c.p_value, c.test, c.significant])


def write_outputs(tables: RunTables, root: Path, csv_path: Path | None = None) -> tuple[str, dict[str, Path]]:
    """``reports/compare.md``, one PNG per metric and optionally the CSV; returns the report's
    text and the files written."""
    text = report(tables)
    (root / REPORTS).mkdir(parents=True, exist_ok=True)
    (root / REPORTS / "compare.md").write_text(text)
    written = {"compare.md": root / REPORTS / "compare.md"}
    written |= {path.name: path for path in plots(tables, root / REPORTS)}
    if csv_path is not None:
        write_csv(tables, csv_path)
        written[csv_path.name] = csv_path
    return text, written


def _flat(tree: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def run_listing(url: str, root: Path) -> str:
    """Every run in the store (newest first) with the params where it differs from the newest
    complete run: experiments (``dvc exp run -S key=value``) are runs of their own."""
    with existing_store(url, root).reader() as session:
        runs = list(session.scalars(select(Run).order_by(Run.started_at.desc())))
        session.expunge_all()
    if not runs:
        raise UserError("the results store holds no run; run `make run` (dvc repro) first")
    reference = next((r for r in runs if r.status == "complete"), runs[0])
    mine = _flat(json.loads(reference.params_json or "{}"))
    rows = []
    for run in runs:
        theirs = _flat(json.loads(run.params_json or "{}"))
        changed = [f"{k}={theirs.get(k)}" for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)]
        rows.append([run.id, run.status, run.profile, str(run.started_at)[:19],
                     "(reference)" if run is reference else (", ".join(changed)[:120] or "same params")])
    return markdown(["run", "status", "profile", "started", "params vs newest complete run"], rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evaluation.compare_all", description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="run id (default: the latest complete run)")
    parser.add_argument("--list", action="store_true", help="list the runs in the store and exit")
    parser.add_argument("--csv", type=Path, help="also write every figure to this CSV file")
    parser.add_argument("--store", help="SQLAlchemy URL (default: store.url of params.yaml)")
    args = parser.parse_args(argv)
    root = Path.cwd()
    try:
        url = args.store or default_store_url(root)
        if args.list:
            print(run_listing(url, root))
            return 0
        tables = load_run(url, root, args.run)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    text, written = write_outputs(tables, root, args.csv)
    print(text)
    print(f"wrote {REPORTS / 'compare.md'} and {sum(p.suffix == '.png' for p in written.values())} plots"
          + (f", {args.csv}" if args.csv else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
