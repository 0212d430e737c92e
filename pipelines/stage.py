"""What every DVC stage does around its own work, written once.

Order, so that bad input never touches the store:
  1. validate the whole params file (one-line error, exit 2);
  2. the stage's preflight checks on its typed section (one-line error, exit 2);
  3. open the store, register the run, do the work, record the stage and its artifacts.

A *run* is one validated parameter set: its id is a prefix of the params hash, so
``dvc repro`` of the same params re-records the same run (rows replaced, never duplicated),
while ``dvc exp run -S key=value`` makes a new one. Its ``store.url`` is the URL the store was
opened at (``$GRIT_STORE_URL`` or ``store.url``) less any password (``db/config.py``), so a
password reaches neither the store, nor the run id, nor a file a stage writes from params.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import subprocess
import sys
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from core.errors import StoppedEarly, UserError
from core.quiet import silence_known_import_noise
from core.threads import llama_threads
from db.config import recorded_store, store_url
from db.models import Run
from db.store import ResultsStore, check_store_writable, open_store, utcnow
from pipelines.params import DEFAULT_PARAMS_PATH, Params, load_params, params_hash

EXIT_USER_ERROR = 2
EXIT_STOPPED_EARLY = 3


@dataclass(frozen=True)
class StageContext:
    """``root``: the workspace the stage runs in (its inputs and outputs); ``store_root``: the
    repository whose results store relative store URLs name (:func:`store_root`)."""

    name: str
    params: Params
    run_id: str
    store: ResultsStore
    root: Path
    store_root: Path


def store_root(workspace: Path) -> Path:
    """Where a relative store URL points: the repository DVC runs the stage for (``DVC_ROOT``),
    else ``workspace``. ``dvc exp run --temp`` and queued experiments run in a temporary copy
    that DVC deletes afterwards; their results must reach the repository's own store."""
    return Path(os.environ.get("DVC_ROOT") or workspace)


def run_id_for(params: Params) -> str:
    return params_hash(params)[:12]


def git_revision(root: Path) -> str | None:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root, capture_output=True, text=True, check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("-dirty" if dirty else "")


def device_description() -> str:
    import torch

    if torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name(0)}"
    return f"cpu ({os.cpu_count()} cores, torch {torch.__version__})"


def stage_params(root: Path, params: Params | None = None) -> dict[str, list[str]]:
    """Stage name -> the params keys it declares in ``dvc.yaml``, in file order; ``foreach``
    stages are expanded over the params mapping they iterate (``train`` -> ``train@baseline_lora``,
    ...) when ``params`` is given."""
    dvc_yaml = root / "dvc.yaml"
    if not dvc_yaml.is_file():
        return {}
    declared: dict[str, list[str]] = {}
    for name, stage in ((yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages") or {}).items():
        source = stage.get("foreach") if isinstance(stage, dict) else None
        if isinstance(source, str) and source.startswith("${") and params is not None:
            keys = (stage.get("do") or {}).get("params") or []
            for item in params.model_dump().get(source[2:-1].strip(), {}):
                declared[f"{name}@{item}"] = [str(k).replace("${key}", item) for k in keys]
        else:
            declared[name] = [str(k) for k in ((stage.get("params") if isinstance(stage, dict) else None) or [])]
    return declared


def pipeline_stage_names(root: Path, params: Params | None = None) -> list[str]:
    """Every stage of ``dvc.yaml`` (``foreach`` expanded): a run is complete when all succeeded."""
    return list(stage_params(root, params))


def _value_at(tree: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _carried_over(store: ResultsStore, run_id: str, stage: str, keys: list[str], params: Params) -> bool:
    """Did ``stage`` succeed in an earlier run with the same values of its own params? ``dvc
    repro`` skips such a stage (its deps and params are unchanged), so its outputs are this
    run's too, and the run can be complete without running it again."""
    mine = params.model_dump(mode="json")
    wanted = {key: _value_at(mine, key) for key in keys}
    for run in store.runs():
        if run.id == run_id:
            continue
        record = store.stages(run.id).get(stage)
        if record is None or record.status != "succeeded":
            continue
        theirs = json.loads(run.params_json)
        if all(_value_at(theirs, key) == value for key, value in wanted.items()):
            return True
    return False


def current_in_lock(root: Path, stages: list[str]) -> set[str]:
    """The leading ``stages`` (in the order given) whose ``dvc.lock`` entry matches the workspace:
    ``dvc repro`` skips them, so their committed outputs are this run's too. A fresh clone's store
    has never recorded them (study's report is committed, not recomputed), and without this its
    run would never be complete. Stops at the first stage DVC would run: that stage records itself
    when it runs. DVC releases its repository lock while a stage's command runs, so a stage may
    ask; when DVC cannot tell (no DVC repository, a lock held), nothing counts as current."""
    if not stages or not (root / "dvc.lock").is_file():
        return set()
    try:
        from dvc.repo import Repo

        current = set()
        with Repo(str(root)) as repo:
            for stage in stages:
                if repo.status(targets=[stage]):
                    break
                current.add(stage)
        return current
    except Exception:  # noqa: BLE001 - any DVC failure means "cannot tell", never a failed stage
        return set()


def _refresh_run_status(store: ResultsStore, run_id: str, root: Path, params: Params) -> None:
    stages = store.stages(run_id)
    declared = stage_params(root, params)
    unrecorded = [s for s in declared if s not in stages
                  and not _carried_over(store, run_id, s, declared[s], params)]
    recorded_ok = bool(declared) and all(stages[s].status == "succeeded" for s in declared if s in stages)
    # DVC is asked only when nothing else stands in the way (it costs a status check).
    complete = recorded_ok and len(current_in_lock(root, unrecorded)) == len(unrecorded)
    failed = any(s.status == "failed" for s in stages.values())
    with store.transaction() as session:
        run = session.get(Run, run_id)
        run.status = "failed" if failed else ("complete" if complete else "running")
        run.finished_at = utcnow() if complete or failed else None


def stage_arguments(
    module: str, argv: list[str] | None = None, add: Callable[[argparse.ArgumentParser], None] | None = None,
) -> argparse.Namespace:
    """The command line of ``python -m pipelines.<module>``: ``--params`` and the flags ``add``
    declares, on one parser, so that ``--help`` lists every flag the stage takes."""
    parser = argparse.ArgumentParser(prog=f"python -m pipelines.{module}")
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS_PATH,
                        help=f"the params file (default: {DEFAULT_PARAMS_PATH})")
    if add is not None:
        add(parser)
    return parser.parse_args(argv)


def variant_argument(parser: argparse.ArgumentParser) -> None:
    """The ``--variant NAME`` of a per-variant stage (``train@``, ``export@``)."""
    parser.add_argument("--variant", required=True, help="the variant of params.variants this stage runs for")


def declared_variant(params: Params, name: str):
    """The variant ``name`` declares in ``params.variants``; a one-line error when it declares none."""
    if name not in params.variants:
        raise UserError(f"variants: no variant named {name!r}; declared: {', '.join(params.variants)}")
    return params.variants[name]


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_USER_ERROR


def _checked_inputs(args: argparse.Namespace, results_root: Path,
                    preflight: Callable[[Params], Any] | None) -> tuple[Params, Any, ResultsStore]:
    """(params, what ``preflight`` returned, the open store), checking everything a user can get
    wrong before the store records anything; a :class:`UserError` names the first problem."""
    params = load_params(args.params)
    url = store_url(params.store)       # $GRIT_STORE_URL, the one place a password may be, else store.url
    params = params.model_copy(update={"store": recorded_store(url)})   # what the run records and hashes
    llama_threads()          # a bad $GRIT_LLAMA_THREADS is one line here, not after training
    check_store_writable(url, results_root)   # before any work: results must be recordable
    checked = preflight(params) if preflight is not None else None
    return params, checked, open_store(url, results_root)


def _start_run(store: ResultsStore, params: Params, root: Path) -> tuple[str, datetime]:
    """Register (or re-register: the same params give the same id) the run; (its id, when the stage started)."""
    run_id = run_id_for(params)
    started = utcnow()
    store.start_run(Run(
        id=run_id, git_revision=git_revision(root), params_hash=params_hash(params),
        params_json=params.model_dump_json(), profile=params.profile,
        host=os.uname().nodename, device=device_description(), started_at=started,
    ))
    return run_id, started


def _stage_failed(ctx: StageContext, started: datetime, error: BaseException) -> int:
    """Record ``error`` as the stage's failure, then report it: a user's error in one line, any
    other with its traceback (called while the error is being handled)."""
    is_user_error = isinstance(error, UserError)
    message = str(error) if is_user_error else f"{type(error).__name__}: {error}"
    ctx.store.record_stage(ctx.run_id, ctx.name, "failed", started, error=message.splitlines()[0] if message else None)
    _refresh_run_status(ctx.store, ctx.run_id, ctx.root, ctx.params)
    if is_user_error:
        return _fail(message)
    traceback.print_exc()
    return 1


def run_stage(
    name: str,
    work: Callable[[StageContext, Any], Mapping[str, Path] | None],
    preflight: Callable[[Params], Any] | None = None,
    argv: list[str] | None = None,
    args: argparse.Namespace | None = None,
) -> int:
    """Run one stage's ``work`` with validation, run bookkeeping and one-line errors.

    ``preflight`` checks cheap things (packages present, input files well formed) before the
    store is opened; whatever it returns is handed to ``work`` so nothing is read twice.
    ``work`` returns the files it produced (name -> path); they are recorded as artifacts.
    ``args``: the command line a stage with flags of its own parsed (:func:`stage_arguments`);
    without it ``argv`` is parsed here (``--params`` only).
    """
    if args is None:
        args = stage_arguments(name, argv)
    # A native crash (a signal) past the up-front runtime checks still says where it happened.
    faulthandler.enable()
    silence_known_import_noise()     # before any work imports PEFT or Unsloth
    root = Path.cwd()
    results_root = store_root(root)
    try:
        params, checked, store = _checked_inputs(args, results_root, preflight)
    except UserError as error:
        return _fail(str(error))

    run_id, started = _start_run(store, params, root)
    context = StageContext(name=name, params=params, run_id=run_id, store=store, root=root, store_root=results_root)
    try:
        produced = work(context, checked) or {}
        store.record_artifacts(run_id, name, produced)
    except StoppedEarly as stop:
        store.record_stage(run_id, name, "incomplete", started, error=str(stop).splitlines()[0])
        _refresh_run_status(store, run_id, root, params)
        print(f"[{name}] {stop}")
        return EXIT_STOPPED_EARLY
    except BaseException as error:  # noqa: BLE001 - recorded as the stage's failure, then reported
        return _stage_failed(context, started, error)
    store.record_stage(run_id, name, "succeeded", started)
    _refresh_run_status(store, run_id, root, params)
    print(f"[{name}] done for run {run_id} ({params.profile} profile)")
    return 0
