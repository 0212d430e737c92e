"""The study's trials per hour with 1 and with 2 local study workers, side by side.

A short study on the embedded SmolLM2-135M (the ``study`` profile cut down: two methods at one run
length, 3 configurations each, one finalist over 2 seeds, 2 test seeds, small held-out sets) is
run from an empty store and ledger with ``python -m pipelines.study --workers K``, for K in the
order 1, 2, 2, 1 (so a drift of the machine's speed falls on both arms), in a copy of the
working tree. Trials per hour = trials recorded / wall seconds x 3600 (set-up of the stage
included: it is what a user waits for). Medians per arm and their ratio are printed.

    python benchmarks/study_workers.py [--repeats 2] [--json FILE]

Run it on a quiet machine: it measures how two workers share the CPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PLAN = ["study.methods=[peft_lora,pure_grit]", "study.steps=[8]", "study.configurations=3", "study.startup=1",
        "study.min_steps=4", "study.finalists=1", "study.finalist_seeds=1", "study.seeds=2",
        "study.refusal_prompts=4", "study.overrefusal_prompts=4", "study.fact_pairs=8", "study.aqi_pairs=8",
        "study.bootstrap_resamples=200", "eval.refusal_samples=2"]


def working_copy(into: Path) -> Path:
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (into / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, into / name)
    return into


def run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return done


def trials_recorded(repo: Path) -> int:
    import sqlite3

    with sqlite3.connect(repo / "outputs/centralized.db") as db:
        return db.execute("SELECT count(*) FROM study_trials").fetchone()[0]


def one_study(repo: Path, env: dict[str, str], workers: int) -> dict[str, float]:
    (repo / "outputs/centralized.db").unlink(missing_ok=True)
    shutil.rmtree(repo / "reports/study/ledger", ignore_errors=True)
    started = time.perf_counter()
    run([sys.executable, "-m", "pipelines.study", "--workers", str(workers)], repo, env)
    seconds = time.perf_counter() - started
    trials = trials_recorded(repo)
    return {"workers": workers, "trials": trials, "seconds": seconds, "trials_per_hour": trials / seconds * 3600}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="runs per arm (order 1, 2, 2, 1, ...)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="study-workers-") as scratch:
        repo = working_copy(Path(scratch) / "repo")
        env = {**os.environ, "PYTHONPATH": str(repo),
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
        run(["git", "init", "-q"], repo, env)
        run([sys.executable, "-m", "pipelines.profile", "study", *PLAN], repo, env)
        run([sys.executable, "-m", "pipelines.prepare_model"], repo, env)
        run([sys.executable, "-m", "pipelines.prepare_data"], repo, env)
        order = [1, 2, 2, 1] * ((args.repeats + 1) // 2)
        runs = []
        for workers in order[:2 * args.repeats]:
            runs.append(one_study(repo, env, workers))
            print(f"{workers} worker(s): {runs[-1]['trials']} trials in {runs[-1]['seconds']:.0f} s "
                  f"= {runs[-1]['trials_per_hour']:.1f} trials/h", flush=True)
    median = {k: statistics.median(r["trials_per_hour"] for r in runs if r["workers"] == k) for k in (1, 2)}
    print(f"median trials/h: 1 worker {median[1]:.1f}, 2 workers {median[2]:.1f}, "
          f"ratio {median[2] / median[1]:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"usable_cpus": len(os.sched_getaffinity(0)), "plan": PLAN, "runs": runs,
                                         "median_trials_per_hour": median,
                                         "ratio_2_to_1": median[2] / median[1]}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
