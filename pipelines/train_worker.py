"""One replicate of one variant trained data-parallel under ``torchrun`` (``train.nproc_per_node > 1``).

``python -m pipelines.train`` launches it, once per seed, as

    torchrun --standalone --nproc_per_node N -m pipelines.train_worker --variant V --seed S --result R

Every rank builds the same model and trains on its own shard of the shared batch order
(accelerate splits each global step's batches across ranks); DDP averages the raw gradients, and
GRIT all-reduces its factor statistics before folding them (``trainers/grit/distributed.py``),
so every rank computes the same inverses and the same update. Rank 0 alone writes the adapter,
the dvclive log and ``R`` (metadata and step rows), which the stage process records in the store;
the stage never opens the store from several processes. Every rank reports a digest of its final
LoRA weights and GRIT factors, and rank 0 stores them: identical digests show the replicas
stayed in step.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
from pathlib import Path

from core.quiet import silence_known_import_noise
from pipelines.params import load_params
from pipelines.replicates import with_seed


def state_digest(model, manager) -> str:
    """sha256 over the LoRA weights and, under GRIT, every module's factor sums."""
    import torch

    digest = hashlib.sha256()
    for name, parameter in sorted(model.named_parameters()):
        if "lora_" in name:
            digest.update(name.encode())
            digest.update(parameter.detach().cpu().to(torch.float64).numpy().tobytes())
    if manager is not None:
        for name in sorted(manager.modules):
            for side in manager.covariances(name)[:2]:
                if side is not None:
                    digest.update(side.detach().cpu().to(torch.float64).numpy().tobytes())
    return digest.hexdigest()


def rank_digests(model, manager) -> dict[str, list[str]]:
    """Every rank's digest of its trained state (run on every rank right after training): equal
    digests show the replicas stayed identical."""
    import torch.distributed as dist

    gathered: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, state_digest(model, manager))
    return {"rank_state_digests": [str(d) for d in gathered]}


def main(argv: list[str] | None = None) -> int:
    silence_known_import_noise()
    from pipelines.train import training_log
    from trainers.base_model import resolve_base_model
    from trainers.recipe import train_variant

    parser = argparse.ArgumentParser(prog="python -m pipelines.train_worker")
    for flag in ("--variant", "--result", "--adapter", "--checkpoints", "--live", "--params"):
        parser.add_argument(flag, required=True)
    parser.add_argument("--seed", type=int, required=True)
    args = parser.parse_args(argv)

    params = with_seed(load_params(Path(args.params)), args.seed)
    files = resolve_base_model(params.model)

    main_rank = int(os.environ.get("RANK", "0")) == 0
    with training_log(Path(args.live)) if main_rank else contextlib.nullcontext() as live:
        result = train_variant(args.variant, params.variants[args.variant], params, files, Path("artifacts/data"),
                               Path(args.adapter), Path(args.checkpoints), live, on_trained=rank_digests)
    if main_rank:
        Path(args.result).write_text(json.dumps({"metadata": result.metadata, "steps": result.steps}, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
