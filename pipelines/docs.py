"""Render every figure block of the README and ``docs/`` from the files that hold the figures.

    python -m pipelines.docs            # rewrite the blocks from the working tree's files
    python -m pipelines.docs --check    # exit 1 when a block differs from the committed files

The blocks (``core/doc_blocks.py``): the evaluation's (``evaluation/doc_figures.py``: the study
headline, the default run's tables, the probe and training tables, stage times, serving speed),
the GPU check's (from ``benchmarks/results/gpu-check-*.json``) and the Llama-3-8B profile's
estimates (``pipelines/gpu_check/estimates.py``, arithmetic on its shapes). The default run's tables
live on ``docs/results.md`` (the README links to them) and the GPU sessions on the dated
``docs/history.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

import yaml

from core.doc_blocks import CommittedSources, DocBlock, Sources, render_pages
from evaluation.doc_figures import BLOCKS as EVALUATION_BLOCKS
from pipelines.gpu_check import estimates
from pipelines.gpu_check.report import docs_block

GPU_REPORTS = {"h100": "benchmarks/results/gpu-check-h100-*.json", "h200": "benchmarks/results/gpu-check-h200-*.json",
               "h100b": "benchmarks/results/gpu-check-h100b-*.json",
               "h200b": "benchmarks/results/gpu-check-h200b-*.json"}


def _gpu(reports: str):
    def render(sources: Sources) -> str:
        return docs_block({name: json.loads(sources.text(name) or "{}") for name in sources.glob(reports)})
    return render


SITTING_START = "benchmarks/results/sitting-start-2cpu.json"


def sitting_start(measured: dict) -> str:
    """docs/study.md's sentences on what a sitting spends before its first trial on a fresh host,
    from the committed measurement (the study's compute counts trials only). A measurement that
    still generated the base model's answers plans without them: sittings now restore the
    study's kept answers (``pipelines/answer_cache.py``). A measured start on a host that kept its
    set-up and cache (``warm_start``, optional) adds one sentence."""
    setup, start = measured["setup"], measured["sitting_start"]
    generated = start.get("answers_generated", True)
    measured_text = (f"On a fresh host a sitting spends time before its first trial that the study's hours of "
                     f"compute do not count. Measured on {measured['cpu_count']} CPU cores ({measured['date']}): "
                     f"`make setup` with a new `GRIT_CACHE_DIR` took {setup['seconds']:,} s, then `make sitting` "
                     f"took {start['seconds_to_first_trial']:,} s to its first trial")
    # A start that generated the answers is planned without them: sittings now restore them.
    minutes = math.ceil((setup["seconds"] + start["seconds_to_first_trial"]
                         - (start["answers_seconds"] if generated else 0)) / 60)
    if not generated:
        text = (f"{measured_text}, with the study's kept answers put into the cache. On a fresh host, plan "
                f"about {minutes} minutes on top of `MINUTES`, plus at most one trial's length "
                "(`pipelines.study.job.sitting_over`).")
    else:
        text = (f"{measured_text}, {start['answers_seconds']:,} s of it generating the base model's greedy "
                f"answers to the {start['answers']} benign training prompts (up to "
                f"{start['answer_max_new_tokens']} tokens each, through llama.cpp). Sittings since put the "
                f"study's kept answers into the cache first and generate none, so on a fresh host plan about "
                f"{minutes} minutes on top of `MINUTES` (the measured times less the generation; not yet "
                f"measured as a whole), plus at most one trial's length (`pipelines.study.job.sitting_over`).")
    warm = measured.get("warm_start")
    if warm:
        text += (f" On a host that kept its set-up and its `GRIT_CACHE_DIR` from an earlier sitting "
                 f"(measured {warm['date']}), `make sitting` reached its first trial in "
                 f"{warm['seconds_to_first_trial']:,} s.")
    return text


def _sitting_start(sources: Sources) -> str:
    text = sources.text(SITTING_START)
    return sitting_start(json.loads(text)) if text else "No sitting's start has been measured yet."


WALKTHROUGH = "benchmarks/results/walkthrough-2cpu.json"
PIPELINE_RUN = "benchmarks/results/pipeline-default-2cpu.json"

# benchmarks/walkthrough.py's steps as the getting-started page names them (its multi-line query and
# the Ollama step's three commands would not fit a table cell).
WALK_STEPS = {"setup": "`make setup`, a new `GRIT_CACHE_DIR`", "run": "`make run` after the set-up (`dvc repro`)",
              "test": "`make test` after the set-up (two test workers)",
              "summary": "`python -m evaluation.compare_all`", "query": "the first query of [store.md](store.md)",
              "ollama": "`make ollama`, `ollama run pure_grit_model ...`, `make ollama-stop`"}


def _duration(seconds: float) -> str:
    return f"{seconds:,.0f} s ({seconds / 60:.1f} min)" if seconds >= 60 else f"{seconds:.1f} s"


def walkthrough_times(walk: dict) -> str:
    """docs/getting-started.md's time table from one newcomer walk-through
    (``benchmarks/walkthrough.py --json``): every step on one fresh clone, one after the other."""
    tests = walk.get("tests", {})
    rows = []
    for step in walk["steps"]:
        time = _duration(step["seconds"])
        if step["name"] == "test" and tests:
            time += ": " + ", ".join(f"{n:,} {word}" for word, n in tests.items())
        rows.append(f"| {WALK_STEPS.get(step['name'], step['name'])} | {time} | "
                    f"{'ok' if step['exit'] == 0 else 'exit ' + str(step['exit'])} |")
    caches = walk.get("host_cache_mib_at_start", {})
    warm = ", ".join(f"{name.replace('_', ' ')} {mib:,.0f} MiB" for name, mib in caches.items()) or "not recorded"
    left = walk.get("left_behind_mib", {})
    return (f"Measured by `python benchmarks/walkthrough.py` at commit `{walk['commit']}` ({walk['date']}, "
            f"{walk['cpu_count']} CPU cores, 1-minute load {walk['load_1min_at_start']:.2f} at the start): a "
            f"fresh clone, a new `GRIT_CACHE_DIR`, pip with an empty config, each step after the one before; "
            f"the host's caches at the start: {warm} (rendered from `{WALKTHROUGH}`).\n\n"
            "| step | time | ended |\n|---|---|---|\n" + "\n".join(rows)
            + (f"\n\nLeft behind: `.venv` {left['venv'] / 1024:.1f} GiB, `$GRIT_CACHE_DIR` "
               f"{left['grit_cache']:,.0f} MiB." if left else ""))


def committed_times(sitting: dict, pipeline: dict, variants_now: int) -> str:
    """The time table before any walk-through is committed: the figures other committed
    measurements hold, each with its date or commit, and the one none holds named as missing. A
    pipeline measured when the default trained fewer variants than ``variants_now`` says so."""
    setup = sitting["setup"]
    conditions = setup["conditions"].replace("GRIT_CACHE_DIR", "`GRIT_CACHE_DIR`")
    trained = sum(stage.startswith("train@") for stage in pipeline["stages"])
    fewer = (f", when the default trained {trained} variants (it trains {variants_now} now: expect longer)"
             if trained != variants_now else "")
    return (f"No newcomer walk-through is committed yet (`python benchmarks/walkthrough.py --json {WALKTHROUGH}` "
            "measures every row on one fresh clone); until then, the committed measurements:\n\n"
            "| step | time |\n|---|---|\n"
            f"| `make setup` on a fresh {sitting['cpu_count']}-core host ({conditions}) | "
            f"{_duration(setup['seconds'])}, {sitting['date']} (`{SITTING_START}`) |\n"
            f"| `dvc repro` on the default, a fresh clone with every cache the pipeline makes hidden | "
            f"{_duration(pipeline['first_repro_s'])} at commit `{pipeline['commit']}`{fewer} (`{PIPELINE_RUN}`; "
            f"its stages: [pipeline.md](pipeline.md#what-make-run-does)) |\n"
            "| `make test` after the set-up | no committed measurement |")


def _times(sources: Sources) -> str:
    walk = sources.text(WALKTHROUGH)
    if walk:
        return walkthrough_times(json.loads(walk))
    variants = yaml.safe_load(sources.text("params.yaml"))["variants"]
    return committed_times(json.loads(sources.text(SITTING_START)), json.loads(sources.text(PIPELINE_RUN)),
                           len(variants))


# Where a block lives when not on the page evaluation/doc_figures.py names: the README keeps the
# study and links to the default run's tables, which would double its length.
PAGES = {"results": "docs/results.md"}

BLOCKS: list[DocBlock] = [
    *(dataclasses.replace(block, page=PAGES.get(block.name, block.page)) for block in EVALUATION_BLOCKS),
    *(DocBlock(f"gpu_check_{gpu}", "docs/history.md", _gpu(reports)) for gpu, reports in GPU_REPORTS.items()),
    DocBlock("gpu_estimates", "docs/gpu.md", lambda _sources: estimates.render()),
    DocBlock("sitting_start", "docs/study.md", _sitting_start),
    DocBlock("times", "docs/getting-started.md", _times),
]


def stale_pages(root: Path, blocks: list[DocBlock] = BLOCKS) -> list[str]:
    """The pages whose blocks differ from the committed files (HEAD) they are rendered from."""
    return [page for page, (now, wanted) in render_pages(blocks, CommittedSources(root)).items() if now != wanted]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.docs", description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("."), help="the repository (default: here)")
    parser.add_argument("--check", action="store_true", help="exit 1 when a page differs from the committed files")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_pages(args.root)
        for page in stale:
            print(f"{page}: its figure blocks differ from the committed files; run python -m pipelines.docs",
                  file=sys.stderr)
        return 1 if stale else 0
    for page, (now, wanted) in render_pages(BLOCKS, Sources(args.root)).items():
        if wanted != now:
            (args.root / page).write_text(wanted)
            print(f"{page}: figure blocks rewritten")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
