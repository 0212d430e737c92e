"""The figure blocks of the README and ``docs/`` that the evaluation's files hold, rendered from
the committed files (``core/doc_blocks.py``; ``python -m pipelines.docs`` writes them):

- README ``study``: the fair study's headline, from ``metrics/study.json``;
- README ``study_progress`` and docs/study.md ``study_parts``: how far the study in the ledger
  (``reports/study/ledger/``) has come, in all and per part;
- README ``results``: the default run's tables as ``compare_all`` prints them (value [interval],
  delta vs base, the figures through Ollama beside llama.cpp's, GRIT vs its control, the success
  criteria, the plain summary), from
  ``metrics/eval.json`` judged with the thresholds of ``params.yaml``;
- docs/method.md ``probe`` and ``training``: what the probe measured (``metrics/probes.json``)
  and how each variant trained (``metrics/train/<variant>.json``);
- docs/pipeline.md ``stages``: the stage times of ``benchmarks/pipeline.py --cold``;
- docs/serving.md ``serving_speed``: ``benchmarks/serving_speed.py``'s side-by-side speeds.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import yaml

from core.doc_blocks import DocBlock, Sources
from evaluation.compare_all import (
    OLLAMA_HEADER,
    OLLAMA_LEGEND,
    RunTables,
    criteria_rows,
    grit_rows,
    legend,
    markdown,
    ollama_rows,
    quality_table,
    recorded_controls,
    recorded_section,
    speed_table,
    summary_line,
)
from evaluation.config import EvalParams
from evaluation.metrics import model_metrics
from evaluation.study_report import PROGRESS_BLOCKS
from export.config import ExportParams, ServeParams

NOT_MODELS = ("comparisons", "across_seeds", "decline_probability_vs_judge", "served_speed_device")

PIPELINE_BENCHMARK = "benchmarks/results/pipeline-default-2cpu.json"
SERVING_BENCHMARK = "benchmarks/results/serving-speed-2cpu.json"


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
    served = {(model, form, metric): [SimpleNamespace(value=value["value"] if isinstance(value, dict) else value)]
              for model in models for form, figures in evaluation[model].get("ollama", {}).items()
              for metric, value in figures.items()}
    return RunTables(SimpleNamespace(id=run_label, params_json=params_json), models, metrics, speeds, comparisons,
                     recorded_section(params.get("eval"), EvalParams),
                     recorded_section(params.get("export"), ExportParams),
                     recorded_section(params.get("serve"), ServeParams), recorded_controls(params), served)


def results_block(evaluation: dict, run_label: str, params_json: str = "{}") -> str:
    tables = tables_from_metrics(evaluation, run_label, params_json)
    quality = markdown(["metric", *tables.models], quality_table(tables))
    speed = markdown(["speed", *tables.models], speed_table(tables))
    criteria = markdown(["success criterion", *(m for m in tables.models if m != "base")], criteria_rows(tables))
    grit = markdown(["pair", "metric", "delta", "95% CI", "test (raw p, Holm p)", "verdict"], grit_rows(tables))
    ollama = (f"Served through Ollama beside llama.cpp:\n\n{markdown(OLLAMA_HEADER, ollama_rows(tables))}\n\n"
              f"{OLLAMA_LEGEND}\n\n" if tables.served else "")
    return (f"{quality}\n\n{legend(tables)}\n\n{speed}\n\n{ollama}{criteria}\n\n{grit}\n\n"
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


def training_block(trained: dict[str, dict]) -> str:
    """docs/method.md's training table: each variant's ``metrics/train/<variant>.json``, and which
    variants trained on the same batches and reached the same losses."""
    header = ["variant", "train time", "tokens/s", "mean train loss", "final loss", "validation loss", "peak RSS"]
    rows = [[name, f"{t['train_seconds']:.0f} s", f"{t['tokens_per_second']:.0f}", f"{t['train_loss']:.3f}",
             f"{t['final_loss']:.3f}", f"{t['final_val_loss']:.3f}", f"{t['peak_rss_mib']:.0f} MiB"]
            for name, t in trained.items()]
    orders = {t["batch_order_hash"][:12] for t in trained.values()}
    batches = (f"every variant trained on the same batches (batch-order hash `{orders.pop()}`)" if len(orders) == 1
               else f"the variants trained on {len(orders)} different batch orders")
    losses: dict[tuple, list[str]] = {}
    for name, t in trained.items():
        losses.setdefault((t["train_loss"], t["final_loss"], t["final_val_loss"]), []).append(name)
    same = [" = ".join(group) for group in losses.values() if len(group) > 1]
    equal = f"; identical losses: {', '.join(same)}" if same else ""
    steps = sorted({t["steps"] for t in trained.values()})
    return (f"{markdown(header, rows)}\n\n{', '.join(map(str, steps))} steps; {batches}{equal} (rendered from the "
            f"committed `metrics/train/<variant>.json`).")


def stages_block(benchmark: dict) -> str:
    """docs/pipeline.md's stage times: ``benchmarks/pipeline.py --cold --json``'s figures."""
    stages = [(f"`{name}`", f"{seconds:.0f}") for name, seconds in benchmark["stages"].items()]
    half = (len(stages) + 1) // 2
    right = stages[half:] + [("", "")] * (2 * half - len(stages))
    rows = [[*left, "", *other] for left, other in zip(stages[:half], right, strict=True)]
    first, second = benchmark["first_repro_s"], benchmark["second_repro_s"]
    rows.append(["**first `dvc repro`**", f"**{first:.0f} ({first / 60:.1f} min)**", "", "**second `dvc repro`**",
                 f"**{second:.1f} ({benchmark['second_repro_stages_run']} stages ran)**"])
    cold = "a cold cache (every cache the pipeline makes hidden)" if benchmark.get("cold_cache") else "warm caches"
    return (f"`python benchmarks/pipeline.py --cold` at commit `{benchmark['commit']}`: a fresh clone, {cold}, "
            f"{benchmark['cpu_count']} CPU cores (rendered from `{PIPELINE_BENCHMARK}`):\n\n"
            + markdown(["stage", "seconds", "", "stage", "seconds"], rows))


def serving_speed_block(benchmark: dict) -> str:
    """docs/serving.md's side-by-side serving speeds: ``benchmarks/serving_speed.py --json``."""
    rows = [[form["label"], f"{form['decode']:.1f} ({form['decode_ratio']:.3f}x)",
             f"{form['prefill']:.1f} ({form['prefill_ratio']:.3f}x)"] for form in benchmark["forms"]]
    fair = benchmark.get("merged_vs_same_format")
    judged = "" if fair is None else (
        f"\n\nThe merged file against the base in its own format (the evaluate stage's criterion): decode "
        f"{fair['decode_ratio']:.3f}x, prefill {fair['prefill_ratio']:.3f}x, paired by round and prompt.")
    ollama = benchmark.get("ollama")
    beside = "" if ollama is None else (
        f"\n\nOllama {ollama['version']} (build `{ollama['build']}`) against llama-cpp-python on the same files, "
        "decode tokens/s (Ollama's own counters), ratio paired by round and prompt: "
        + "; ".join(f"{form} {f['ollama_decode']:.1f} against {f['llama_cpp_decode']:.1f} ({f['decode_ratio']:.3f}x)"
                    for form, f in ollama["forms"].items()) + ".")
    return (f"`python benchmarks/serving_speed.py` ({benchmark['adapter']}; llama.cpp, {benchmark['threads']} "
            f"threads, {benchmark['rounds']} interleaved rounds x {benchmark['prompts']} prompts, medians; rendered "
            f"from `{SERVING_BENCHMARK}`):\n\n" + markdown(["", "decode tokens/s", "prefill tokens/s"], rows)
            + judged + beside)


def _json(sources: Sources, relative: str) -> dict:
    text = sources.text(relative)
    if text is None:
        raise FileNotFoundError(f"{relative} is missing: it holds the figures a page quotes")
    return json.loads(text)


def _params_sections(sources: Sources) -> str:
    params = yaml.safe_load(sources.text("params.yaml") or "{}") or {}
    return json.dumps({k: params.get(k, {}) for k in ("eval", "export", "serve")})


def _study(sources: Sources) -> str:
    from evaluation.study_report import readme_block, reported_study

    return readme_block(reported_study(sources))


def _trained(sources: Sources) -> dict[str, dict]:
    return {Path(name).stem: json.loads(sources.text(name) or "{}") for name in sources.glob("metrics/train/*.json")}


BLOCKS = [
    DocBlock("study", "README.md", _study),
    *PROGRESS_BLOCKS,
    DocBlock("results", "README.md", lambda s: results_block(_json(s, "metrics/eval.json"),
                                                             "recorded in `metrics/eval.json`", _params_sections(s))),
    DocBlock("probe", "docs/method.md", lambda s: probe_block(_json(s, "metrics/probes.json"))),
    DocBlock("training", "docs/method.md", lambda s: training_block(_trained(s))),
    DocBlock("stages", "docs/pipeline.md", lambda s: stages_block(_json(s, PIPELINE_BENCHMARK))),
    DocBlock("serving_speed", "docs/serving.md", lambda s: serving_speed_block(_json(s, SERVING_BENCHMARK))),
]
