"""A newcomer's first hour, timed: on a fresh clone of HEAD with a new, empty ``GRIT_CACHE_DIR``,
the README's two commands, then the summary, a query from docs/store.md and ``ollama run
pure_grit_model`` exactly as the pages print them. Records what each step took and ended with.

    python benchmarks/walkthrough.py --json benchmarks/results/walkthrough-2cpu.json
    python benchmarks/walkthrough.py --keep /tmp/walk      # keep the clone, its cache and logs

Steps, in this order (each one's wall time, exit status and last lines are recorded; a failed step
is recorded and the later ones still run, so one run shows everything a newcomer would meet):

    setup    make setup            pip with an empty config, as CI (.ci/run)
    run      make run              README line 1; the set-up is done, so this is `dvc repro`
    test     make test             README line 2
    summary  python -m evaluation.compare_all
    query    the first `sqlite3` command of docs/store.md
    ollama   make ollama, the `ollama run` line of docs/serving.md, make ollama-stop

The commands of the last two steps are read from the committed pages, so the walk-through runs
what a newcomer reads; a page that no longer holds one is an error before anything runs. Only the
``GRIT_CACHE_DIR`` is new: pip's download cache and Go's caches are the host's, and their sizes at
the start are recorded (a warm pip cache saves the 6.4 GB download, not the install). Time it with
nothing else running: the 1-minute load average at the start is recorded beside the figures.
Commit the JSON as ``benchmarks/results/walkthrough-2cpu.json``: ``python -m pipelines.docs``
renders docs/getting-started.md's time table from it. With ``--keep``, the clone's ``dvc.lock`` and
``metrics/`` are a whole default run of the committed code on a fresh host: copy them back and
commit them when that run should replace the committed one.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as ``python benchmarks/walkthrough.py``: the project is importable
TAIL_LINES = 12

from benchmarks.pipeline import cloned_head  # noqa: E402  (after the path is set; the same fresh clone of HEAD)


@dataclass(frozen=True)
class Step:
    name: str
    command: str          # a bash command line, run in the clone
    seconds: float
    exit: int
    tail: str             # the last lines of its output


def bash_blocks(page: str) -> list[str]:
    """The ```bash fenced blocks of a Markdown page, in order."""
    return re.findall(r"^```bash\n(.*?)^```", page, flags=re.M | re.S)


def store_query(page: str) -> str:
    """The first ``sqlite3`` command of docs/store.md (a whole block: the query spans lines)."""
    for block in bash_blocks(page):
        if block.startswith("sqlite3 "):
            return block.strip()
    raise ValueError("docs/store.md holds no ```bash block that starts with sqlite3")


def ollama_run_line(page: str) -> str:
    """The ``ollama run pure_grit_model`` line of docs/serving.md's first block that has one."""
    for block in bash_blocks(page):
        for line in block.splitlines():
            if "ollama run pure_grit_model" in line and not line.lstrip().startswith("#"):
                return line.strip()
    raise ValueError("docs/serving.md holds no `ollama run pure_grit_model` line in a ```bash block")


def pytest_counts(output: str) -> dict[str, int]:
    """The counts of pytest's last summary line (``3 failed, 785 passed, 2 warnings in 331.0s``)."""
    summaries = [line for line in output.splitlines() if re.search(r"\d+ (passed|failed|error)", line)]
    if not summaries:
        return {}
    return {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|errors?|skipped|xfailed)", summaries[-1])}


def cache_mib(path: Path) -> float:
    """The size of a cache folder in MiB (0 when absent): how warm the host's caches were."""
    if not path.is_dir():
        return 0.0
    return round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink()) / 2**20, 1)


def host_cache_dirs(env: dict[str, str]) -> dict[str, Path]:
    """pip's download cache and Go's build and module caches, where this host keeps them."""
    def asked(command: list[str]) -> Path | None:
        try:
            out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None
        return Path(out) if out else None

    found = {"pip": asked([sys.executable, "-m", "pip", "cache", "dir"]),
             "go_build": asked(["go", "env", "GOCACHE"]), "go_modules": asked(["go", "env", "GOMODCACHE"])}
    return {name: path for name, path in found.items() if path is not None}


def newcomer_env(cache: Path) -> dict[str, str]:
    """This host's environment as a newcomer's shell has it: no active virtual environment, pip with
    an empty config (as CI), and a new ``GRIT_CACHE_DIR``."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PIP_FIND_LINKS", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL",
                        "PIP_CONSTRAINT")}
    venv_bin = str(ROOT / ".venv" / "bin")
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != venv_bin)
    return {**env, "PIP_CONFIG_FILE": "/dev/null", "GRIT_CACHE_DIR": str(cache), "PYTHONUNBUFFERED": "1"}


def run_step(name: str, command: str, clone: Path, env: dict[str, str], logs: Path) -> Step:
    """Run one step in the clone, its output to ``logs/<name>.log``; print where it ended."""
    first, *more = command.splitlines()
    print(f"[walkthrough] {name}: {first}{' ...' if more else ''}", flush=True)
    log = logs / f"{name}.log"
    started = time.perf_counter()
    with log.open("w") as sink:
        done = subprocess.run(["bash", "-c", command], cwd=clone, env=env, stdout=sink, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-TAIL_LINES:])
    print(f"[walkthrough] {name}: exit {done.returncode} after {seconds:.0f} s (log {log})", flush=True)
    return Step(name, command, round(seconds, 1), done.returncode, tail)


def parsed(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="an empty folder for the clone, cache and logs (default: a "
                                                  "temporary one, removed at the end)")
    parser.add_argument("--json", type=Path, help="write the record to this JSON file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parsed(argv)
    if args.keep and args.keep.exists() and any(args.keep.iterdir()):
        print(f"error: {args.keep} is not empty; pass an empty or new --keep folder", file=sys.stderr)
        return 2
    try:   # the pages' commands, before hours of work that would end without them
        query = store_query((ROOT / "docs" / "store.md").read_text())
        chat = ollama_run_line((ROOT / "docs" / "serving.md").read_text())
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    work = args.keep or Path(tempfile.mkdtemp(prefix="grit-walkthrough-"))
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    logs.mkdir()
    env = newcomer_env(work / "cache")
    load = os.getloadavg()[0]
    caches = {name: cache_mib(path) for name, path in host_cache_dirs(env).items()}
    clone, head = cloned_head(work)
    print(f"[walkthrough] {head} in {clone}; load {load:.2f}; host caches (MiB): {caches}", flush=True)

    steps = [run_step(name, command, clone, env, logs) for name, command in (
        ("setup", "make setup"), ("run", "make run"), ("test", "make test"),
        ("summary", ".venv/bin/python -m evaluation.compare_all"), ("query", query),
        ("ollama", f"make ollama && {chat}; status=$?; make ollama-stop; exit $status"),
    )]
    record = {
        "commit": head, "date": datetime.date.today().isoformat(), "cpu_count": os.cpu_count(),
        "load_1min_at_start": round(load, 2), "host_cache_mib_at_start": caches,
        "tests": pytest_counts((logs / "test.log").read_text(errors="replace")),
        "left_behind_mib": {"venv": cache_mib(clone / ".venv"), "grit_cache": cache_mib(work / "cache")},
        "steps": [asdict(step) for step in steps],
    }
    print("\n".join(f"  {s.name:<8} {s.seconds:8.1f} s  exit {s.exit}" for s in steps))
    if args.json:
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(step.exit == 0 for step in steps) else 1


if __name__ == "__main__":
    raise SystemExit(main())
