"""DVC stage ``probe``: does GRIT's preconditioning change the updates? (docs/method.md)

For every variant with ``grit: true``, in its own process (Unsloth patches libraries globally):
build the variant's model as training does, run its first training steps twice from the same
initial adapter on the same batches, GRIT off (control) and GRIT attached as the variant attaches
it, and measure over the ``probe.steps`` after GRIT's natural-gradient warm-up (none in the
default run's variants; ``trainers/probe/measure.py::probe_start``) what GRIT captured, inverted and changed
(``trainers/probe``). The trained loss curves are compared with the same-engine control variant.
GRIT's peers (a variant with a ``lora_optimizer`` of PEFT's: Riemannian-preconditioned LoRA,
LoRA+) are probed the same way against plain LoRA's step (``trainers/probe/peers.py``).

Writes ``metrics/probes.json`` (verdicts, reasons, headline figures), ``artifacts/probes/<variant>.json``
(every module), ``plots/probe_update_divergence.png`` and the store's ``probe_results``. Exits
non-zero when a GRIT variant is inert, unless ``probe.allow_inert: true``: the run's claim is
about GRIT, and an inert GRIT is the failure this stage exists to catch. A peer's inert verdict is
a finding about the control (PEFT's Riemannian preconditioner is exactly scalar on A while B is
zero, so over the probe's first steps its step is mostly a rescaled LoRA step), reported and
stored like any verdict, and the run goes on.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

from core.errors import UserError
from core.files import atomic_write_json
from core.quiet import silence_known_import_noise
from db.models import ProbeResult
from pipelines.params import Params, load_params
from pipelines.paths import DATA_DIR, loss_curve
from pipelines.stage import StageContext, run_stage, stage_arguments
from trainers.config import preconditioner
from trainers.hardware import check_hardware

DETAILS = Path("artifacts/probes")
METRICS = Path("metrics/probes.json")
PLOT = Path("plots/probe_update_divergence.png")


def probed_variants(params: Params) -> list[str]:
    """The variants whose step differs from plain LoRA's: GRIT's and its peers'."""
    return [name for name, variant in params.variants.items() if preconditioner(variant) is not None]


def read_loss_curve(root: Path, variant: str) -> dict[int, float] | None:
    """step -> training loss from the variant's dvclive log (None when it was not trained)."""
    path = root / loss_curve(variant)
    if not path.is_file():
        return None
    with path.open(newline="") as handle:
        return {int(row["step"]): float(row["loss"]) for row in csv.DictReader(handle, delimiter="\t")}


def common_steps(first: dict[int, float], second: dict[int, float]) -> tuple[list[float], list[float]]:
    """Both curves on the steps they share, in step order."""
    steps = sorted(first.keys() & second.keys())
    return [first[s] for s in steps], [second[s] for s in steps]


# ---------------------------------------------------------------------------------- worker

def probe_variant(root: Path, params: Params, name: str) -> dict[str, Any]:
    """Both arms for one probed variant, and its verdict (runs in the worker process)."""
    from trainers.base_model import resolve_base_model
    from trainers.probe.math import compare_curves
    from trainers.probe.variant import probe_variant as probe

    control_name = params.variants[name].control
    trajectory = None
    if control_name is not None:
        curves = read_loss_curve(root, name), read_loss_curve(root, control_name)
        if all(curves) and curves[0].keys() & curves[1].keys():
            trajectory = compare_curves(*common_steps(*curves))
    with tempfile.TemporaryDirectory(prefix=f"probe-{name}-") as workdir:
        return probe(name, params, resolve_base_model(params.model), root / DATA_DIR, Path(workdir), trajectory,
                     control_name if trajectory else None)


def worker_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of the one-variant process the stage starts (:func:`_run_worker`)."""
    parser.add_argument("--worker", action="store_true",
                        help="probe one variant in this process (the stage starts one per variant)")
    parser.add_argument("--variant", help="with --worker: the variant to probe")
    parser.add_argument("--output", type=Path, help="with --worker: where its result is written (JSON)")


def _worker(args: argparse.Namespace) -> int:
    silence_known_import_noise()     # a process of its own: the stage's silencing does not reach it
    if args.variant is None or args.output is None:
        raise SystemExit("error: --worker takes --variant NAME and --output FILE")
    result = probe_variant(Path.cwd(), load_params(args.params), args.variant)
    atomic_write_json(args.output, result)
    return 0


# ----------------------------------------------------------------------------------- stage

def summary(result: dict[str, Any]) -> dict[str, Any]:
    """The headline figures of one variant for ``metrics/probes.json``."""
    from trainers.probe.math import median

    modules = result["measurements"]["modules"]
    updates = [m["update"] for m in modules if m["update"]]
    gradients = [m["gradient"] for m in modules if m["gradient"]]
    trajectory = result["measurements"]["trajectory"] or {}
    return {
        "verdict": result["verdict"], "reasons": result["reasons"],
        "preconditioner": result["measurements"]["preconditioner"],
        # the measured steps follow this many (GRIT's natural-gradient warm-up), trained alike
        "start_step": result.get("start_step", 0), "start_difference": result.get("start_difference"),
        "checks": {c["name"]: c["detail"] for c in result["checks"]},
        "modules": len(modules),
        "modules_ready": sum(m["usable_A"] and m["usable_B"] for m in modules),
        "update_cosine_median": median([u["cosine"] for u in updates]),
        "update_cosine_min": min((u["cosine"] for u in updates if u["cosine"] is not None), default=None),
        "update_relative_difference_median": median([u["relative_difference"] for u in updates]),
        "scalar_twin_cosine_median": median([m["scalar_update"]["cosine"] for m in modules if m["scalar_update"]]),
        # the twin against plain LoRA: what a step size alone does to the update (records before: absent)
        "twin_control_cosine_median": median([m["twin_update"]["cosine"] for m in modules if m.get("twin_update")]),
        "gradient_cosine_median": median([g["cosine"] for g in gradients]),
        "gradient_norm_ratio_median": median([g["norm_ratio"] for g in gradients]),
        "scalar_distance_median": median([m["scalar_distance"] for m in modules]),
        "condition_number_median": median([m["condition"] for m in modules]),
        "loss_correlation": trajectory.get("correlation"),
        "loss_max_abs_difference": trajectory.get("max_abs_difference"),
        "trajectory_control": result["measurements"]["trajectory_control"],
        **({"modalities": {m: {"verdict": r["verdict"], "reasons": r["reasons"],
                               "modules": len(r["measurements"]["modules"]), "precondition": r["precondition"]}
                           for m, r in result["modalities"].items()}} if "modalities" in result else {}),
    }


def store_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """ProbeResult rows: per module (step: the measured window's last, per-step cosines at their
    step of training) and the verdict and checks under module ``*``."""
    m = result["measurements"]
    start = result.get("start_step", 0)
    rows: list[dict[str, Any]] = [{"module": "*", "metric": "verdict", "step": 0,
                                   "value": 1.0 if result["verdict"] == "effective" else 0.0,
                                   "text": ", ".join(result["reasons"]) or "every check passed"}]
    rows += [{"module": "*", "metric": f"check:{c['name']}", "step": 0,
              "value": None if c["passed"] is None else float(c["passed"]), "text": c["detail"]}
             for c in result["checks"]]
    trajectory = m["trajectory"] or {}
    for key in ("correlation", "max_abs_difference"):
        if trajectory.get(key) is not None:
            rows.append({"module": "*", "metric": f"loss_{key}", "step": 0, "value": trajectory[key],
                         "text": m["trajectory_control"]})
    for module in m["modules"]:
        figures = {"rows_captured": module["rows_captured"], "ready": float(module["usable_A"] and module["usable_B"]),
                   "scalar_distance": module["scalar_distance"], "condition_number": module["condition"]}
        for kind in ("update", "gradient", "scalar_update", "twin_update"):
            for key, value in (module.get(kind) or {}).items():
                figures[f"{kind}_{key}"] = value
        rows += [{"module": module["name"], "metric": key, "step": start + m["steps"], "value": value, "text": None}
                 for key, value in figures.items() if value is not None]
        if module.get("capture_path"):      # which path captured its rows: fused functions or hooks
            rows.append({"module": module["name"], "metric": "capture_path", "step": start + m["steps"],
                         "value": None, "text": module["capture_path"]})
        rows += [{"module": module["name"], "metric": "step_update_cosine", "step": k, "value": cosine, "text": None}
                 for k, cosine in enumerate(module["step_update_cosines"], start=start + 1) if cosine is not None]
    return rows


def _run_worker(ctx: StageContext, params_path: Path, name: str, output: Path) -> dict[str, Any]:
    command = [sys.executable, "-m", "pipelines.probe", "--worker", "--variant", name, "--output", str(output),
               "--params", str(params_path)]
    completed = subprocess.run(command, cwd=ctx.root)
    if completed.returncode != 0 or not output.is_file():
        raise RuntimeError(f"the probe of {name} failed (exit {completed.returncode}); see its output above")
    return json.loads(output.read_text())


def preflight(params: Params) -> list[str]:
    data_file = DATA_DIR / ("train_pairs.jsonl" if params.model.kind == "vlm" else "train.jsonl")
    if not data_file.is_file():
        raise UserError(f"{data_file} is missing; run `dvc repro prepare_data` first")
    check_hardware(params.model, params.train)
    return probed_variants(params)


def probe(params_path: Path, ctx: StageContext, names: list[str]) -> dict[str, Path]:
    from trainers.probe.plot import plot_update_divergence
    from trainers.probe.verdict import NAMES

    results = []
    with tempfile.TemporaryDirectory(prefix="probe-") as scratch:
        for name in names:
            method = NAMES[preconditioner(ctx.params.variants[name])]
            print(f"[probe] {name}: {ctx.params.probe.steps} steps with and without {method}")
            results.append(_run_worker(ctx, params_path.resolve(), name, Path(scratch) / f"{name}.json"))
    produced: dict[str, Path] = {}
    for result in results:
        path = ctx.root / DETAILS / f"{result['variant']}.json"
        atomic_write_json(path, result)
        produced[f"details/{result['variant']}"] = path
    summaries = {r["variant"]: summary(r) for r in results}
    atomic_write_json(ctx.root / METRICS, {"steps": ctx.params.probe.steps, "variants": summaries})
    produced["metrics"] = ctx.root / METRICS
    if results:
        produced["plot"] = plot_update_divergence(results, ctx.params.probe.min_update_change, ctx.root / PLOT)
    with ctx.store.transaction() as session:
        ctx.store.replace_rows(session, ProbeResult, ctx.run_id, [])   # variants no longer declared
        for result in results:
            ctx.store.replace_rows(session, ProbeResult, ctx.run_id, store_rows(result), variant=result["variant"])
    for name, s in summaries.items():
        print(f"[probe] {name}: {s['verdict'].upper()}"
              + (f" ({', '.join(s['reasons'])})" if s["reasons"] else "")
              + (f"; measured after its {s['start_step']}-step natural-gradient warm-up (arms "
                 f"{_fmt(s['start_difference'])} apart there)" if s["start_step"] else "")
              + f"; update cosine vs control median {_fmt(s['update_cosine_median'])}, "
              f"vs its scalar twin {_fmt(s['scalar_twin_cosine_median'])} (the twin vs control "
              f"{_fmt(s.get('twin_control_cosine_median'))}), "
              f"loss-curve correlation {_fmt(s['loss_correlation'])}")
        for detail in s["checks"].values():
            print(f"[probe]   - {detail}")
        for modality, m in s.get("modalities", {}).items():
            print(f"[probe]   {modality} ({m['modules']} modules): {m['verdict'].upper()}"
                  + (f" ({', '.join(m['reasons'])})" if m["reasons"] else ""))
    if not names:
        print("[probe] no variant has grit: true or a lora_optimizer; nothing to probe")
    inert = stopping_verdicts(ctx.params, summaries)
    if inert and not ctx.params.probe.allow_inert:
        methods = sorted({NAMES[preconditioner(ctx.params.variants[n])] for n in inert})
        raise UserError(f"{' and '.join(methods)} {'is' if len(methods) == 1 else 'are'} inert in {', '.join(inert)} "
                        "(reasons: "
                        f"{'; '.join(', '.join(summaries[n]['reasons']) for n in inert)}); "
                        "see metrics/probes.json, or set probe.allow_inert: true to go on")
    return produced


def stopping_verdicts(params: Params, summaries: dict[str, dict[str, Any]]) -> list[str]:
    """The inert variants that stop the run: GRIT's (module docstring); a peer's inert verdict is
    printed as a finding."""
    inert = [name for name, s in summaries.items() if s["verdict"] != "effective"]
    for name in inert:
        if not params.variants[name].grit:
            print(f"[probe] {name}: its optimizer's step is inert against plain LoRA's over the probe's "
                  f"{params.probe.steps} steps ({', '.join(summaries[name]['reasons'])}): a finding about this "
                  "peer, recorded in metrics/probes.json; the run goes on")
    return [name for name in inert if params.variants[name].grit]


def main(argv: list[str] | None = None) -> int:
    args = stage_arguments("probe", argv, worker_flags)
    if args.worker:
        return _worker(args)
    return run_stage("probe", partial(probe, args.params), preflight=preflight, args=args)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    raise SystemExit(main())
