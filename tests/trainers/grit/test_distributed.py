"""Two gloo ranks on different data end with identical factors and adapters (and would not
without the factor all-reduce)."""

from __future__ import annotations

import torch
import torch.multiprocessing as mp

from tiny_lora import ddp_worker


def test_factors_and_adapters_stay_identical_across_ranks(tmp_path):
    mp.spawn(ddp_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))

    synced0, synced1 = rank0[True], rank1[True]
    for name, (su, sv) in synced0["factors"].items():
        assert torch.equal(su, synced1["factors"][name][0]) and torch.equal(sv, synced1["factors"][name][1])
    for name, weight in synced0["lora"].items():
        assert torch.equal(weight, synced1["lora"][name]), name

    local0, local1 = rank0[False], rank1[False]
    factor_gap = max(float((local0["factors"][n][0] - local1["factors"][n][0]).abs().max()) for n in local0["factors"])
    weight_gap = max(float((local0["lora"][n] - local1["lora"][n]).abs().max()) for n in local0["lora"])
    assert factor_gap > 0 and weight_gap > 0, "without the all-reduce the replicas must diverge"
