"""Time the whole pipeline: a full ``dvc repro`` from a fresh clone with an empty DVC cache, then
a second ``dvc repro`` that must do nothing.

    python benchmarks/pipeline.py                    # the default profile (params.yaml of HEAD)
    python benchmarks/pipeline.py --cold-answers     # also regenerate the base model's answers
    python benchmarks/pipeline.py --cold             # as on a machine fresh from set-up (see below)
    python benchmarks/pipeline.py --profile smoke    # the smoke profile (a minute or two)

The clone is of the committed HEAD (uncommitted changes are not benchmarked: commit first). It
uses this checkout's ``.venv`` (installs are not timed) and ``$GRIT_CACHE_DIR`` (the de-quantized
base model, llama.cpp's converters). ``--cold-answers`` hides the cached greedy answers of the
base model (``$GRIT_CACHE_DIR/answers``) so ``prepare_data`` generates them as on a new machine;
``--cold`` hides every cache entry the pipeline itself makes (answers, the de-quantized models,
converted GGUFs, tokenizers) and keeps only what the set-up made (llama.cpp's build and converters).
Targets (issue: the whole pipeline): first run <= 30 min on 2 CPU cores, second run < 10 s and
no stage executed. Prints both times, their ratio to the targets, and every stage's duration
from the clone's results store.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIRST_TARGET_S, SECOND_TARGET_S = 30 * 60, 10.0


# Cache entries the pipeline makes on its first run (the rest is made by scripts/setup.sh).
PIPELINE_MADE = ("answers", "models", "gguf", "tokenizers")


def cache_without(real: Path, scratch: Path, hidden: tuple[str, ...]) -> Path:
    """A cache directory that links every entry of the real one except ``hidden``."""
    scratch.mkdir(parents=True, exist_ok=True)
    for entry in real.iterdir() if real.is_dir() else []:
        if entry.name not in hidden:
            (scratch / entry.name).symlink_to(entry)
    return scratch


def timed(command: list[str], cwd: Path, env: dict[str, str], log: Path) -> tuple[float, str]:
    """Run ``command``, echoing DVC's stage lines with the elapsed time; (seconds, output)."""
    started = time.perf_counter()
    lines = []
    with subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True) as process, log.open("a") as sink:
        for line in process.stdout:
            sink.write(line)
            lines.append(line)
            if line.startswith("Running stage") or "didn't change, skipping" in line:
                print(f"  [{time.perf_counter() - started:7.1f} s] {line.strip()}", flush=True)
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        tail = "".join(lines[-40:])
        raise SystemExit(f"error: {' '.join(command)} failed (exit {process.returncode}); log {log}\n{tail}")
    return seconds, "".join(lines)


def stage_durations(clone: Path) -> list[tuple[str, float]]:
    with sqlite3.connect(clone / "outputs" / "centralized.db") as db:
        return db.execute("SELECT stage, duration_s FROM stage_runs ORDER BY started_at").fetchall()


def parsed(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cold-answers", action="store_true", help="regenerate the base model's answers")
    parser.add_argument("--cold", action="store_true",
                        help="hide every cache entry the pipeline makes: as on a machine fresh from set-up")
    parser.add_argument("--profile", default=None, help="compose this profile into params.yaml first")
    parser.add_argument("--keep", type=Path, help="clone here and keep it (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    return parser.parse_args(argv)


def cloned_head(work: Path) -> tuple[Path, str]:
    """(a fresh clone of this checkout's HEAD under ``work``, HEAD's short hash)."""
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.strip()
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()
    if dirty:
        print(f"note: uncommitted changes are not benchmarked; cloning HEAD {head}", file=sys.stderr)
    clone = work / "repo"
    if clone.exists():
        raise SystemExit(f"error: {clone} exists; pass an empty --keep folder")
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    return clone, head


def clone_env(args: argparse.Namespace, work: Path) -> dict[str, str]:
    """This checkout's environment for the clone; with ``--cold``/``--cold-answers`` a cache
    folder that hides what the pipeline would otherwise find already made."""
    env = {**os.environ, "PATH": f"{ROOT / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}", "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONPATH", None)
    real_cache = Path(os.environ.get("GRIT_CACHE_DIR") or Path.home() / ".cache" / "grit-lora")
    if args.cold or args.cold_answers:
        hidden = PIPELINE_MADE if args.cold else ("answers",)
        env["GRIT_CACHE_DIR"] = str(cache_without(real_cache, work / "cache", hidden))
    return env


def report(args: argparse.Namespace, head: str, first: float, second: float, ran: list[str],
           stages: list[tuple[str, float]]) -> dict:
    """Print the stage durations and both times against their targets; the figures for ``--json``."""
    width = max(len(name) for name, _ in stages)
    print("\nstage durations (results store of the clone):")
    for name, seconds in stages:
        print(f"  {name:<{width}}  {seconds:8.1f} s")
    figures = {
        "commit": head, "profile": args.profile or "params.yaml of HEAD",
        "cold_answers": args.cold_answers or args.cold,
        "cold_cache": args.cold,
        "cpu_count": os.cpu_count(), "first_repro_s": round(first, 1), "second_repro_s": round(second, 1),
        "second_repro_stages_run": len(ran), "stages": {name: round(s, 1) for name, s in stages},
        "first_vs_target": round(first / FIRST_TARGET_S, 3), "second_vs_target": round(second / SECOND_TARGET_S, 3),
    }
    print(f"\nfirst  dvc repro: {first:8.1f} s = {first / 60:.1f} min  ({figures['first_vs_target']:.2f}x the "
          f"{FIRST_TARGET_S // 60} min target)")
    print(f"second dvc repro: {second:8.1f} s  ({figures['second_vs_target']:.2f}x the "
          f"{SECOND_TARGET_S:.0f} s target), stages run: {len(ran)}")
    return figures


def main(argv: list[str] | None = None) -> int:
    args = parsed(argv)
    work = args.keep or Path(tempfile.mkdtemp(prefix="grit-pipeline-bench-"))
    clone, head = cloned_head(work)
    env = clone_env(args, work)
    if args.profile:
        subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "-m", "pipelines.profile", args.profile], cwd=clone,
                       env=env, check=True)

    log = work / "dvc-repro.log"
    print(f"benchmarking `dvc repro` of {head} in {clone} (log: {log})", flush=True)
    first, _ = timed(["dvc", "repro"], clone, env, log)
    print(f"first dvc repro: {first:.1f} s", flush=True)
    second, output = timed(["dvc", "repro"], clone, env, log)
    ran = [line for line in output.splitlines() if line.startswith("Running stage")]
    figures = report(args, head, first, second, ran, stage_durations(clone))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if not ran else 1


if __name__ == "__main__":
    raise SystemExit(main())
