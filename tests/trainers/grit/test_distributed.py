"""Two gloo ranks on different data end with identical factors and adapters (and would not
without the factor all-reduce); truncation, which DDP cannot follow, is refused there."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
from tiny_lora import ddp_worker


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> tuple[dict, dict]:
    """What each of two gloo ranks recorded (one spawn for every test here)."""
    folder = tmp_path_factory.mktemp("ddp")
    mp.spawn(ddp_worker, args=(2, str(folder)), nprocs=2, join=True)
    return tuple(torch.load(folder / f"rank{r}.pt", weights_only=False) for r in (0, 1))


def test_truncation_is_refused_in_a_data_parallel_group(ranks):
    for results in ranks:
        assert results["truncate"].startswith("grit.truncate cannot train data-parallel (2 processes)")


def test_factors_and_adapters_stay_identical_across_ranks(ranks):
    rank0, rank1 = ranks

    synced0, synced1 = rank0[True], rank1[True]
    for name, (su, sv) in synced0["factors"].items():
        assert torch.equal(su, synced1["factors"][name][0]) and torch.equal(sv, synced1["factors"][name][1])
    for name, weight in synced0["lora"].items():
        assert torch.equal(weight, synced1["lora"][name]), name

    local0, local1 = rank0[False], rank1[False]
    factor_gap = max(float((local0["factors"][n][0] - local1["factors"][n][0]).abs().max()) for n in local0["factors"])
    weight_gap = max(float((local0["lora"][n] - local1["lora"][n]).abs().max()) for n in local0["lora"])
    assert factor_gap > 0 and weight_gap > 0, "without the all-reduce the replicas must diverge"
