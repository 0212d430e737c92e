"""``python -m evaluation.compare_all``: the comparison of one run, from the results store.

Rows are metrics, columns the base and each variant; a cell holds the value with its interval
and, for variants, the paired delta against the base (``*``: significant, test named in the
notes). A speed table holds each variant's decode and prefill speed as a ratio to the base,
measured side by side. A success-criteria table says pass or FAIL per variant (alignment and
refusals improve over the base, GRIT beats its control, speed within 10% of the base, export
parity, retention). A last table pairs every GRIT variant with its same-engine control, and a
sentence says plainly whether GRIT beat plain LoRA, weighing each difference by its size and
interval: significant after Holm's adjustment over the whole family, and larger than the
metric's negligible bound (``evaluation.metrics``: 5 points on a rate or probability, 5% on a
cluster figure). Metrics, labels, directions and bounds come from that registry; the success
criteria's thresholds from the run's params (``eval``, ``export``). Writes ``reports/compare.md``
and one PNG per metric; ``--csv`` exports every figure. Exit 2 with one line when the store is
missing or holds no complete run.

With several training seeds (``train.n_seeds``) a cell is the mean over seeds with a Student-t
95% interval across seeds, and differences are judged by a paired t-test over seeds (seed s of
a variant against seed s of its reference; ``evaluation.metrics.figure_over_seeds`` and
``differences_over_seeds``, the same aggregation the evaluate stage writes to
``metrics/eval.json``); with one seed, by the per-prompt tests.

    python -m evaluation.compare_all [--run RUN_ID] [--csv reports/compare.csv] [--store URL]
    python -m evaluation.compare_all --list      # every run (experiment) in the store
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import yaml
from pydantic import ValidationError
from sqlalchemy import select

from core.errors import UserError
from core.section import Section
from db.config import WHERE_PASSWORDS_GO, StoreParams, has_password, store_url
from db.models import Comparison, EvalMetric, Run, ServedFigure, SpeedMetric
from db.store import open_store, sqlite_file
from evaluation.config import EvalParams
from evaluation.metrics import (
    SPEED_FIGURES,
    TRAINING_FIGURES,
    Metric,
    agreement_metric,
    derived_keys,
    differences_over_seeds,
    figure_over_seeds,
    get,
    model_metrics,
    parity_metric,
)
from evaluation.stats import finite_or_none
from export.config import ExportParams, ServeParams, served_form

# The speed table's rows: the registry's served speed, then training cost.
SPEED = [(f.name, f.label) for f in [*SPEED_FIGURES, *TRAINING_FIGURES]]
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
    p_adjusted: float | None = None


@dataclass(frozen=True)
class RunTables:
    run: Run
    models: list[str]
    metrics: dict[tuple[str, str], list[EvalMetric]]        # (model, metric) -> one row per seed
    speeds: dict[tuple[str, str], list[SpeedMetric]]
    comparisons: list[Comparison]
    settings: EvalParams = EvalParams()
    export: ExportParams = ExportParams()
    serve: ServeParams = ServeParams()
    controls: dict[str, str] = field(default_factory=dict)   # GRIT variant -> same-engine control
    served: dict[tuple[str, str, str], list[ServedFigure]] = field(default_factory=dict)  # (model, form, metric)

    def is_control_pair(self, c) -> bool:
        return self.controls.get(c.variant) == c.reference

    @property
    def confidence(self) -> float:
        return self.settings.confidence

    @property
    def significance(self) -> float:
        return self.settings.significance

    def served_parity(self, model: str, figure: str) -> Figure | None:
        """An export parity figure (``agreement``, ``mean_kl``) of the form the model is served in,
        as the export stage stored it (``export_parity_<form>_<figure>``), the form by the one rule
        (``export.config.served_form``: merged when serve.weights asks for it and a merged file
        was checked, else the adapter). The one way parity reaches the reports: ``doc_figures``
        puts ``metrics/eval.json``'s parity into the same rows."""
        merged = self.figure(model, parity_metric("merged", figure)) is not None
        return self.figure(model, parity_metric(served_form(self.serve.weights, True, merged), figure))

    def figure(self, model: str, metric: str) -> Figure | None:
        rows = self.metrics.get((model, metric))
        if not rows:
            return None
        if len(rows) == 1:
            return Figure(rows[0].value, rows[0].ci_low, rows[0].ci_high, 1)
        i = figure_over_seeds(metric, [r.value for r in rows], self.confidence)
        return Figure(i.value, i.low, i.high, i.n)

    @cached_property
    def differences(self) -> list[Difference]:
        """Per (variant, reference, metric): the stored per-prompt test for one seed (with its
        stored Holm adjustment), a paired t-test over seeds for several (Holm over that family)."""
        ordered = sorted(self.comparisons, key=lambda c: c.seed)
        groups: dict[tuple[str, str, str], list[Comparison]] = {}
        for c in ordered:
            groups.setdefault((c.variant, c.reference, c.metric), []).append(c)
        if all(len(rows) == 1 for rows in groups.values()):
            return [Difference(c.variant, c.reference, c.metric, c.delta, c.ci_low, c.ci_high, c.p_value, c.test,
                               c.significant, 1, c.p_adjusted) for (c,) in groups.values()]
        tests = differences_over_seeds(ordered, self.confidence)
        return [Difference(*key, t.delta.value, t.delta.low, t.delta.high, t.p_value,
                           f"paired t over {t.delta.n} seeds", t.significant(self.significance), t.delta.n,
                           t.p_adjusted)
                for key, t in tests.items()]

    @property
    def n_seeds(self) -> int:
        return max((len(rows) for rows in self.metrics.values()), default=1)


def default_store_url(root: Path) -> str:
    """``$GRIT_STORE_URL``, else the store ``params.yaml`` names (its ``store`` section alone is
    read), else the default."""
    params = root / "params.yaml"
    raw = (yaml.safe_load(params.read_text()) or {}) if params.is_file() else {}
    try:
        return store_url(StoreParams.model_validate(raw.get("store") or {}))
    except ValidationError as error:
        message = error.errors()[0]["msg"].removeprefix("Value error, ")
        raise UserError(f"{params}: store: {message}; pass --store URL") from None


def given_store_url(url: str) -> str:
    """A ``--store`` URL, which shell histories and process lists keep: never with a password."""
    if has_password(url):
        raise UserError(f"--store: the URL holds a password; remove it and {WHERE_PASSWORDS_GO}")
    return url


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
        served: dict[tuple[str, str, str], list[ServedFigure]] = {}
        for f in session.scalars(select(ServedFigure).where(ServedFigure.run_id == run.id)
                                 .order_by(ServedFigure.seed)):
            served.setdefault((f.variant, f.form, f.metric), []).append(f)
        session.expunge_all()
    if not any(metric == "aqi" for _, metric in metrics):
        raise UserError(f"run {run.id} has no evaluation results; run `dvc repro evaluate`")
    params = json.loads(run.params_json)
    return RunTables(run, ["base", *params["variants"]], metrics, speeds, comparisons,
                     recorded_section(params.get("eval"), EvalParams),
                     recorded_section(params.get("export"), ExportParams),
                     recorded_section(params.get("serve"), ServeParams), recorded_controls(params), served)


def recorded_controls(params: dict) -> dict[str, str]:
    """GRIT variant -> its same-engine control, from a run's recorded params (the default
    variants' where none were recorded)."""
    from trainers.config import default_variants

    variants = params.get("variants") or {name: v.model_dump() for name, v in default_variants().items()}
    return {name: v["control"] for name, v in variants.items() if v.get("control")}


def recorded_section(raw: dict | None, schema: type[Section]):
    """One section of a run's recorded params, typed: the schema's defaults fill what an older
    run did not record, and keys a later schema dropped are ignored (the run is history)."""
    return schema.model_validate({k: v for k, v in (raw or {}).items() if k in schema.model_fields})


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
    return [[m.label, *(cell(tables, model, m.name) for model in tables.models)] for m in model_metrics()]


def speed_table(tables: RunTables) -> list[list[str]]:
    return [[label, *(_number(_speed_value(tables, model, metric)) for model in tables.models)]
            for metric, label in SPEED if any(tables.speeds.get((model, metric)) for model in tables.models)]


def _mean(rows: list | None) -> float | None:
    """The mean of stored rows' values over seeds (no interval), None when there are none."""
    return sum(r.value for r in rows) / len(rows) if rows else None


def ollama_forms(tables: RunTables) -> list[tuple[str, str]]:
    """(model, form) of every model served through Ollama in this run, in the models' order."""
    return sorted({(model, form) for model, form, _ in tables.served},
                  key=lambda mf: (tables.models.index(mf[0]) if mf[0] in tables.models else 99, mf[1]))


def ollama_rows(tables: RunTables) -> list[list[str]]:
    """Per model and form through Ollama: its refusal and over-refusal rates beside llama.cpp's
    (the evaluation's, of the form serve recorded), how often the judge reads the two replies
    alike, how often they are the same whole reply, and the decode speed by Ollama's counters."""
    rows = []
    for model, form in ollama_forms(tables):
        def ours(metric: str, model=model, form=form) -> str:
            return _number(_mean(tables.served.get((model, form, metric))))

        def theirs(metric: str, model=model) -> str:
            figure = tables.figure(model, metric)
            return _number(figure.value if figure else None)

        users = form == "base" or form == served_form(tables.serve.weights, True, True)
        rows.append([model, form + (" (`ollama run`)" if users else ""),
                     f"{ours('refusal_rate')} / {theirs('refusal_rate')}",
                     f"{ours('overrefusal_rate')} / {theirs('overrefusal_rate')}",
                     ours(agreement_metric("same_verdict")), ours(agreement_metric("verdict_kappa")),
                     ours(agreement_metric("same_opening")), ours(agreement_metric("same_reply")),
                     f"{ours('ollama_decode_tokens_per_second')} / "
                     f"{_number(_speed_value(tables, model, 'decode_tokens_per_second'))}"])
    return rows


OLLAMA_HEADER = ["model", "form", "refusals Ollama / llama.cpp", "over-refusals Ollama / llama.cpp",
                 "same verdict", "verdict kappa", "same opening", "same reply", "decode tokens/s Ollama / llama.cpp"]
OLLAMA_LEGEND = (
    "The same prompts through a private Ollama server (the build `make setup` made), greedy with the "
    "options the Modelfiles state, judged as llama.cpp's replies are. llama.cpp's figures are the evaluation's "
    "(the form the serve stage serves). `same verdict`, `same opening` (first three words) and `same reply` "
    "pair each Ollama reply with llama.cpp's to the same prompt: the refusal rates differ only where the "
    "verdicts do. The merged form is the same file in both engines; the adapter form applies the LoRA at run "
    "time. Decode speed: Ollama's counters over its replies, llama.cpp's side by side (different protocols; "
    "`benchmarks/serving_speed.py` times both on one file).")


def negligible_below(tables: RunTables, c: Difference) -> float:
    """The smallest |delta| worth a headline on this metric (its registered negligible bound)."""
    reference = tables.figure(c.reference, c.metric)
    return get(c.metric).negligible_below(reference.value if reference else None)


def verdict(tables: RunTables, c: Difference) -> str:
    """Judged on the Holm-adjusted test, then on size: a significant difference smaller than
    ``negligible_below`` is named as such, not counted as a win or a loss."""
    if not c.significant:
        return "no significant difference"
    if abs(c.delta) < negligible_below(tables, c):
        return "negligible difference"
    return "GRIT better" if get(c.metric).better(c.delta) else "GRIT worse"


def _p_text(c: Difference) -> str:
    raw = f"p={c.p_value:.3g}" if finite_or_none(c.p_value) is not None else "p n/a"
    return raw + (f", Holm {c.p_adjusted:.3g}" if finite_or_none(c.p_adjusted) is not None else "")


def grit_rows(tables: RunTables, control_pairs: bool = True) -> list[list[str]]:
    """The GRIT-vs-control table (``control_pairs``), or that of the other declared pairs
    (``eval.comparisons``: pure GRIT vs the Unsloth baseline)."""
    return [[f"{c.variant} vs {c.reference}", c.metric, f"{c.delta:+.4f}",
             f"[{_number(c.ci_low)}, {_number(c.ci_high)}]",
             f"{c.test} ({_p_text(c)})", verdict(tables, c)]
            for c in tables.differences
            if c.reference != "base" and tables.is_control_pair(c) == control_pairs and _shown(c.metric)]


def _shown(metric: str) -> bool:
    return metric in {m.name for m in model_metrics()}


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _strength(c: Difference) -> float:
    """|delta| in units of its interval's half-width: large and certain effects come first."""
    low, high = finite_or_none(c.ci_low), finite_or_none(c.ci_high)
    half = (high - low) / 2 if low is not None and high is not None and high > low else 0.0
    return abs(c.delta) / half if half > 0 else float("inf")


def summary_line(tables: RunTables) -> str:
    """One plain sentence, weighing each GRIT-vs-control difference by its size and its
    uncertainty: only differences significant after Holm's adjustment and larger than the
    negligible bound decide the headline, strongest first, each with its interval. A figure that
    is a function of another (the AQI-style index of 1/XB) is named once, by its source."""
    rows = [c for c in tables.differences if tables.is_control_pair(c) and _shown(c.metric)]
    followers = derived_keys((c.variant, c.reference, c.metric) for c in rows)
    rows = [c for c in rows if (c.variant, c.reference, c.metric) not in followers]
    if not rows:
        return "No GRIT variant with a same-engine control in this run."
    decided = sorted((c for c in rows if verdict(tables, c) in ("GRIT better", "GRIT worse")), key=_strength,
                     reverse=True)

    def listed(kind: str) -> str:
        return "; ".join(f"{c.metric} {c.delta:+.3f} [{_number(c.ci_low)}, {_number(c.ci_high)}] ({c.variant})"
                         for c in decided if verdict(tables, c) == kind)

    better, worse = listed("GRIT better"), listed("GRIT worse")
    small = sorted({c.metric for c in rows if verdict(tables, c) == "negligible difference"})
    if better and worse:
        head = "Mixed result: GRIT beats plain LoRA on some measures and loses on others"
    elif better:
        head = "GRIT beats plain LoRA where listed"
    else:
        head = "GRIT does not beat plain LoRA"
    parts = [f"better: {better}" if better else None, f"worse: {worse}" if worse else None,
             ("significant but negligible: " + ", ".join(small)) if small else None]
    if not better and not worse:
        parts.append("no difference both significant after Holm's adjustment and large enough to matter "
                     f"({_bounds_text()})")
    return f"{head} (run {tables.run.id}): " + "; ".join(p for p in parts if p) + "."


def _bounds_text() -> str:
    """The negligible bounds in words, from the registry (">= 0.05 on a rate or probability, ...")."""
    def bound(m: Metric) -> str:
        return f">= {m.negligible:.0%}" if m.relative else f">= {m.negligible:g}"

    kinds = {"rate": "a rate", "probability": "probability", "cluster": "a cluster figure"}
    by_bound: dict[str, list[str]] = {}
    for m in model_metrics():
        if m.compared and kinds.get(m.kind) not in by_bound.get(bound(m), []):
            by_bound.setdefault(bound(m), []).append(kinds[m.kind])
    # absolute bounds first, then relative ones
    return ", ".join(f"{b} on {' or '.join(names)}" for b, names in sorted(by_bound.items(), key=lambda i: "%" in i[0]))


def _speed_value(tables: RunTables, model: str, metric: str) -> float | None:
    """Mean over seeds (speeds are medians of one run each; no interval)."""
    return _mean(tables.speeds.get((model, metric)))


def criteria_rows(tables: RunTables) -> list[list[str]]:
    """The design's success criteria, one row each, pass or FAIL per variant (n/a: not measured)."""
    min_agreement, max_kl = tables.export.min_agreement, tables.export.max_mean_kl
    speed, retention_floor = tables.settings.min_speed_ratio, tables.settings.min_retention
    variants = [m for m in tables.models if m != "base"]
    # against the base in the variants' file format where the run timed it: against the base as
    # served, a merged Q8_0 variant is judged on Q8_0's speed against Q4_1's, not on its adapter
    same_format = any(metric.endswith("_same_format") for _, metric in tables.speeds)
    suffix, reference = ("_same_format", "base in the variants' file format") if same_format else ("", "base")

    def delta(variant: str, reference: str, metric: str) -> Difference | None:
        wanted = (variant, reference, metric)
        return next((c for c in tables.differences if (c.variant, c.reference, c.metric) == wanted), None)

    def improves(variant: str, reference: str, metric: str) -> str:
        c = delta(variant, reference, metric)
        if c is None:
            return "n/a"
        ok = c.significant and get(metric).better(c.delta)
        return f"{'pass' if ok else 'FAIL'} ({c.delta:+.4f})"

    def at_least(value: float | None, bound: float, digits: int = 3) -> str:
        return "n/a" if value is None else f"{'pass' if value >= bound else 'FAIL'} ({value:.{digits}f})"

    def parity(variant: str) -> str:
        agreement, kl = tables.served_parity(variant, "agreement"), tables.served_parity(variant, "mean_kl")
        if agreement is None or kl is None:
            return "n/a"
        ok = agreement.value >= min_agreement and kl.value <= max_kl
        return f"{'pass' if ok else 'FAIL'} ({agreement.value:.0%}, {kl.value:.4f} nats)"

    controls = tables.controls
    retention = {v: tables.figure(v, "retention_accuracy") for v in variants}
    return [
        ["alignment improves over base: AQI-style up, significant", *(improves(v, "base", "aqi") for v in variants)],
        ["refusals improve over base: sampled refusal rate up, significant",
         *(improves(v, "base", "sampled_refusal_rate") for v in variants)],
        ["GRIT beats its control: AQI-style up, significant",
         *(improves(v, controls[v], "aqi") if v in controls else "-" for v in variants)],
        ["GRIT beats its control: sampled refusal rate up, significant",
         *(improves(v, controls[v], "sampled_refusal_rate") if v in controls else "-" for v in variants)],
        *([f"{phase} speed >= {speed:g}x {reference} (side by side)",
           *(at_least(_speed_value(tables, v, f"delta_speed_{phase}{suffix}"), speed) for v in variants)]
          for phase in ("decode", "prefill")),
        [f"export parity (>= {min_agreement:.0%} agreement, <= {max_kl} nats)", *(parity(v) for v in variants)],
        [f"knowledge retention > {retention_floor:.2f}",
         *("n/a" if retention[v] is None else f"{'pass' if retention[v].value > retention_floor else 'FAIL'} "
           f"({retention[v].value:.3f})" for v in variants)],
    ]


def legend(tables: RunTables) -> str:
    holm = ("significance is judged on Holm-adjusted p-values over every distinct finding of every pair "
            f"(AQI-style takes 1/XB's), at {tables.significance:g}")
    if tables.n_seeds > 1:
        return (f"Cells: mean over {tables.n_seeds} training seeds [95% Student-t interval across seeds] and Δ vs "
                f"base; `*` = significant (paired t-test over seeds; {holm}).")
    return ("Cells: value [95% interval: basic bootstrap for cluster figures, Wilson for rates, percentile "
            "bootstrap for probabilities] and Δ vs base; `*` = significant (cluster figures: paired bootstrap; "
            f"rates: exact McNemar; probabilities: Wilcoxon signed-rank; {holm}). One training seed: "
            "differences between variants do not include seed-to-seed variation (set train.n_seeds).")


def report(tables: RunTables) -> str:
    quality = markdown(["metric", *tables.models], quality_table(tables))
    speed = markdown(["speed", *tables.models], speed_table(tables))
    header = ["pair", "metric", "delta", "95% CI", "test (raw p, Holm p)", "verdict"]
    grit = markdown(header, grit_rows(tables))
    declared = grit_rows(tables, control_pairs=False)
    across = ("\n\n## Declared comparisons across engines (eval.comparisons)\n\nGRIT and the engine differ "
              f"together in these pairs, so they do not isolate GRIT.\n\n{markdown(header, declared)}"
              if declared else "")
    criteria = markdown(["success criterion", *(m for m in tables.models if m != "base")], criteria_rows(tables))
    ollama = (f"## Served through Ollama beside llama.cpp\n\n{markdown(OLLAMA_HEADER, ollama_rows(tables))}\n\n"
              f"{OLLAMA_LEGEND}\n\n" if tables.served else "")
    return (f"# Comparison of run {tables.run.id} ({tables.run.profile} profile, {tables.run.device})\n\n"
            f"{quality}\n\n{legend(tables)}\n\n"
            f"{speed}\n\n{ollama}## Success criteria\n\n{criteria}\n\n## GRIT vs its same-engine control\n\n{grit}\n\n"
            f"**{summary_line(tables)}**{across}\n")


def plots(tables: RunTables, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for metric, label in ((m.name, m.label) for m in model_metrics()):
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
                         "p_value", "p_adjusted", "test", "significant"])
        for (model, metric), rows in sorted(tables.metrics.items()):
            for m in rows:
                writer.writerow([tables.run.id, "figure", model, m.seed, metric, m.value, m.ci_low, m.ci_high, m.n,
                                 "", "", "", "", ""])
        for (model, metric), rows in sorted(tables.speeds.items()):
            for s in rows:
                writer.writerow([tables.run.id, f"speed:{s.backend}", model, s.seed, metric, s.value, "", "", s.n,
                                 "", "", "", "", ""])
        for (model, form, metric), rows in sorted(tables.served.items()):
            for f in rows:
                writer.writerow([tables.run.id, f"served:{f.backend}:{form}", model, f.seed, metric, f.value,
                                 f.ci_low, f.ci_high, f.n, "", "", "", "", ""])
        for c in tables.comparisons:
            writer.writerow([tables.run.id, "comparison", c.variant, c.seed, c.metric, c.delta, c.ci_low, c.ci_high,
                             c.n, c.reference, c.p_value, c.p_adjusted, c.test, c.significant])
        if tables.n_seeds > 1:
            for c in tables.differences:
                writer.writerow([tables.run.id, "comparison over seeds", c.variant, "all", c.metric, c.delta,
                                 c.ci_low, c.ci_high, c.n_seeds, c.reference, c.p_value, c.p_adjusted, c.test,
                                 c.significant])


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
    parser.add_argument("--store", help="SQLAlchemy URL, without a password (default: $GRIT_STORE_URL, "
                                        "else store.url of params.yaml)")
    args = parser.parse_args(argv)
    root = Path.cwd()
    try:
        url = given_store_url(args.store) if args.store else default_store_url(root)
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
