"""DVC stage ``train@<variant>``: train one variant in its own process.

Reads params sections ``train``, ``lora``, ``grit``, ``variants``, ``model`` and ``data``
(sequence length). Writes ``artifacts/adapters/<variant>/`` (PEFT adapter + grit_metadata.json),
``metrics/train/<variant>.json`` and the dvclive log ``dvclive/train/<variant>/``; per-step rows
go to the results store. A killed run resumes from ``outputs/checkpoints/<variant>``. With
``train.n_seeds > 1`` the variant is trained once per seed, replicate seed ``s`` under
``seed-<s>/`` of each of those folders (``pipelines/replicates.py``).
"""

from __future__ import annotations

import json
import shutil
import sys
from functools import partial
from pathlib import Path

from sqlalchemy import select

from core.errors import UserError
from core.files import atomic_write_json, files_under, fresh_staging_dir, publish_directory
from db.models import TrainMetric, Variant
from pipelines.params import Params
from pipelines.paths import CHECKPOINTS, DATA_DIR, TRAIN_LIVE, TRAIN_METRICS, adapter_dir
from pipelines.replicates import replicate_path, with_seed
from pipelines.stage import StageContext, declared_variant, run_stage, stage_arguments, variant_argument
from trainers.base_model import resolve_base_model
from trainers.grit_vlm.presets import vlm_config
from trainers.hardware import check_hardware


def training_log(directory: Path):
    """The dvclive log of one replicate's training (steps, losses, GRIT figures)."""
    from dvclive import Live

    return Live(dir=str(directory), dvcyaml=None, save_dvc_exp=False, report=None, resume=False)


def check_same_batches(ctx: StageContext, variant_name: str, seed: int, batch_hash: str) -> None:
    """Fairness: every variant of a run must have trained on exactly the same batches (per seed)."""
    with ctx.store.reader() as session:
        others = session.scalars(select(Variant).where(Variant.run_id == ctx.run_id, Variant.name != variant_name,
                                                       Variant.name != "base", Variant.seed == seed)).all()
    for other in others:
        recorded = json.loads(other.details_json or "{}").get("batch_order_hash")
        if recorded and recorded != batch_hash:
            raise UserError(f"unfair comparison: {variant_name} trained on other batches than {other.name} "
                            f"(batch-order hash {batch_hash[:12]} vs {recorded[:12]})")


def check_same_trainer(ctx: StageContext, variant_name: str, seed: int, trainer_class: str) -> None:
    """Fairness: a variant and its control (or the variants it controls) train through the same
    trainer class, whatever order their stages ran in; otherwise more than GRIT differs."""
    paired = {name for name, v in ctx.params.variants.items() if v.control == variant_name}
    control = ctx.params.variants[variant_name].control
    paired |= {control} if control else set()
    if not paired:
        return
    with ctx.store.reader() as session:
        others = session.scalars(select(Variant).where(Variant.run_id == ctx.run_id, Variant.name.in_(paired),
                                                       Variant.seed == seed)).all()
    for other in others:
        recorded = json.loads(other.details_json or "{}").get("trainer_class")
        if recorded and recorded != trainer_class:
            raise UserError(f"unfair comparison: {variant_name} trained through {trainer_class}, its pair "
                            f"{other.name} through {recorded}")


def preflight(variant_name: str, params: Params):
    variant = declared_variant(params, variant_name)
    check_hardware(params.model, params.train)
    data_file = DATA_DIR / ("train_pairs.jsonl" if params.model.kind == "vlm" else "train.jsonl")
    if not data_file.is_file():
        raise UserError(f"{data_file} is missing; run `dvc repro prepare_data` first")
    if params.model.kind == "vlm" and params.train.nproc_per_node > 1:
        raise UserError("train.nproc_per_node: data-parallel training is built for language models only; "
                        "set it to 1 for model.kind: vlm")
    if params.model.kind == "vlm":
        vlm_config(params)   # the preset vlm.preset names, its overrides and the tiny model agree
    return variant


def train_replicate(variant_name: str, ctx: StageContext, variant, seed: int) -> dict:
    params = with_seed(ctx.params, seed)
    files = resolve_base_model(params.model)
    adapter = replicate_path(adapter_dir(variant_name), ctx.params, seed)
    live_dir = ctx.root / replicate_path(TRAIN_LIVE / variant_name, ctx.params, seed)
    checkpoints = ctx.root / replicate_path(CHECKPOINTS / variant_name, ctx.params, seed)
    # The adapter is written beside its folder and put in place only once training succeeded
    # (dvc.yaml keeps the previous one: persist), so a failed run never leaves half an adapter.
    staging = fresh_staging_dir(ctx.root / adapter)
    try:
        if ctx.params.train.nproc_per_node > 1:
            meta, steps = launch_data_parallel(variant_name, ctx, seed, staging, checkpoints, live_dir)
        else:
            from trainers.recipe import train_variant  # imported here: the engine may import Unsloth

            with training_log(live_dir) as live:
                result = train_variant(variant_name, variant, params, files, ctx.root / DATA_DIR, staging,
                                       checkpoints, live)
            meta, steps = result.metadata, result.steps
        check_same_batches(ctx, variant_name, seed, meta["batch_order_hash"])
        check_same_trainer(ctx, variant_name, seed, meta["trainer_class"])
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    publish_directory(staging, ctx.root / adapter)
    with ctx.store.transaction() as session:
        ctx.store.replace_rows(session, TrainMetric, ctx.run_id, steps, variant=variant_name, seed=seed)
        ctx.store.replace_rows(session, Variant, ctx.run_id, [{
            "engine": variant.engine, "base_model": files.name, "adapter_path": str(adapter),
            "details_json": json.dumps({k: meta.get(k) for k in (
                "grit", "grit_door", "batch_order_hash", "train_seconds", "final_loss", "final_val_loss",
                "tokens_per_second", "trainable_parameters",
                "peak_rss_mib", "peak_cuda_mib", "engine_notes", "grit_all_ready", "trainer_class",
                "unsloth_state")}, default=str),
        }], name=variant_name, seed=seed)
    validation = f", validation loss {meta['final_val_loss']:.4f}" if meta.get("final_val_loss") is not None else ""
    print(f"[train] {variant_name} (seed {seed}): {meta['steps']} steps in {meta['train_seconds']:.0f} s, "
          f"final loss {meta['final_loss']:.4f}{validation}, {meta['tokens_per_second']:.0f} tokens/s")
    return {k: meta.get(k) for k in ("final_loss", "final_val_loss", "train_loss", "train_seconds",
                                     "tokens_per_second", "peak_rss_mib", "peak_cuda_mib", "steps",
                                     "batch_order_hash", "grit_all_ready", "trainable_parameters")}


def launch_data_parallel(variant_name: str, ctx: StageContext, seed: int, adapter: Path, checkpoints: Path,
                         live_dir: Path) -> tuple[dict, list[dict]]:
    """Train one replicate under torchrun (``pipelines/train_worker.py``); rank 0's results."""
    import subprocess
    import tempfile

    import yaml

    with tempfile.TemporaryDirectory(prefix=f"train-{variant_name}-") as scratch:
        params_file, result_file = Path(scratch) / "params.yaml", Path(scratch) / "result.json"
        params_file.write_text(yaml.safe_dump(ctx.params.model_dump(mode="json"), sort_keys=False))
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={ctx.params.train.nproc_per_node}", "-m", "pipelines.train_worker",
                   "--variant", variant_name, "--seed", str(seed), "--params", str(params_file),
                   "--result", str(result_file), "--adapter", str(adapter), "--checkpoints", str(checkpoints),
                   "--live", str(live_dir)]
        print(f"[train] {variant_name} (seed {seed}): {' '.join(command)}", flush=True)
        if subprocess.run(command, cwd=ctx.root).returncode != 0 or not result_file.is_file():
            raise RuntimeError(f"data-parallel training of {variant_name} (seed {seed}) failed; see the log above")
        result = json.loads(result_file.read_text())
    return result["metadata"], result["steps"]


def train(variant_name: str, ctx: StageContext, variant) -> dict[str, Path]:
    # The primary seed first: it replaces the variant's folders, the replicates nest inside.
    summaries = {seed: train_replicate(variant_name, ctx, variant, seed) for seed in ctx.params.train.seeds}
    summary = dict(summaries[ctx.params.train.seed])
    if len(summaries) > 1:
        summary["seeds"] = {str(seed): s for seed, s in summaries.items()}
    atomic_write_json(ctx.root / TRAIN_METRICS / f"{variant_name}.json", summary)
    return {**files_under(ctx.root / adapter_dir(variant_name), "adapter/"),
            "metrics": ctx.root / TRAIN_METRICS / f"{variant_name}.json"}


def main(argv: list[str] | None = None) -> int:
    args = stage_arguments("train", argv, variant_argument)
    return run_stage(f"train@{args.variant}", partial(train, args.variant),
                     preflight=partial(preflight, args.variant), args=args)


if __name__ == "__main__":
    raise SystemExit(main())
