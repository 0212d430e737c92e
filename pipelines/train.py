"""DVC stage ``train@<variant>``: train one variant in its own process.

Reads params sections ``train``, ``lora``, ``grit``, ``variants``, ``model`` and ``data``
(sequence length). Writes ``artifacts/adapters/<variant>/`` (PEFT adapter + grit_metadata.json),
``metrics/train/<variant>.json`` and the dvclive log ``dvclive/train/<variant>/``; per-step rows
go to the results store. A killed run resumes from ``outputs/checkpoints/<variant>``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sqlalchemy import select

from db.models import TrainMetric, Variant
from pipelines.errors import UserError
from pipelines.files import atomic_write_json
from pipelines.params import Params
from pipelines.stage import StageContext, run_stage
from trainers.base_model import check_runtime, resolve_base_model

DATA_DIR = Path("artifacts/data")
ADAPTERS = Path("artifacts/adapters")
CHECKPOINTS = Path("outputs/checkpoints")
METRICS = Path("metrics/train")
LIVE = Path("dvclive/train")


def adapter_dir(variant: str) -> Path:
    return ADAPTERS / variant


def check_same_batches(ctx: StageContext, variant_name: str, batch_hash: str) -> None:
    """Fairness: every variant of a run must have trained on exactly the same batches."""
    with ctx.store.reader() as session:
        others = session.scalars(select(Variant).where(Variant.run_id == ctx.run_id, Variant.name != variant_name,
                                                       Variant.name != "base")).all()
    for other in others:
        recorded = json.loads(other.details_json or "{}").get("batch_order_hash")
        if recorded and recorded != batch_hash:
            raise UserError(f"unfair comparison: {variant_name} trained on other batches than {other.name} "
                            f"(batch-order hash {batch_hash[:12]} vs {recorded[:12]})")


def _variant_from_argv(argv: list[str] | None) -> tuple[str, list[str]]:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--variant", required=True)
    known, rest = parser.parse_known_args(argv if argv is not None else sys.argv[1:])
    return known.variant, rest


def main(argv: list[str] | None = None) -> int:
    variant_name, rest = _variant_from_argv(argv)

    def preflight(params: Params):
        if variant_name not in params.variants:
            raise UserError(f"variants: no variant named {variant_name!r}; declared: {', '.join(params.variants)}")
        check_runtime(params.model)
        if not (DATA_DIR / "train.jsonl").is_file():
            raise UserError(f"{DATA_DIR}/train.jsonl is missing; run `dvc repro prepare_data` first")
        return params.variants[variant_name]

    def train(ctx: StageContext, variant) -> dict[str, Path]:
        from dvclive import Live

        from trainers.recipe import train_variant

        files = resolve_base_model(ctx.params.model)
        live_dir = ctx.root / LIVE / variant_name
        with Live(dir=str(live_dir), dvcyaml=None, save_dvc_exp=False, report=None, resume=False) as live:
            result = train_variant(variant_name, variant, ctx.params, files, ctx.root / DATA_DIR,
                                   ctx.root / adapter_dir(variant_name), ctx.root / CHECKPOINTS / variant_name, live)
        meta = result.metadata
        check_same_batches(ctx, variant_name, meta["batch_order_hash"])
        with ctx.store.transaction() as session:
            ctx.store.replace_rows(session, TrainMetric, ctx.run_id, result.steps, variant=variant_name, seed=0)
            ctx.store.replace_rows(session, Variant, ctx.run_id, [{
                "engine": variant.engine, "base_model": files.name, "adapter_path": str(adapter_dir(variant_name)),
                "details_json": json.dumps({k: meta[k] for k in (
                    "grit", "grit_door", "batch_order_hash", "train_seconds", "final_loss", "tokens_per_second",
                    "peak_rss_mib", "engine_notes", "grit_all_ready")}, default=str),
            }], name=variant_name, seed=0)
        summary = {k: meta[k] for k in ("final_loss", "train_loss", "train_seconds", "tokens_per_second",
                                        "peak_rss_mib", "steps", "batch_order_hash", "grit_all_ready")}
        atomic_write_json(ctx.root / METRICS / f"{variant_name}.json", summary)
        print(f"[train] {variant_name}: {meta['steps']} steps in {meta['train_seconds']:.0f} s, "
              f"final loss {meta['final_loss']:.4f}, {meta['tokens_per_second']:.0f} tokens/s")
        produced = {f"adapter/{p.name}": p for p in sorted(result.adapter_dir.iterdir()) if p.is_file()}
        return {**produced, "metrics": ctx.root / METRICS / f"{variant_name}.json"}

    return run_stage(f"train@{variant_name}", train, preflight=preflight, argv=rest)


if __name__ == "__main__":
    raise SystemExit(main())
