"""GRIT's peers probed for real on a tiny Llama, through the Trainer wiring the pipeline trains with
(``trainers/probe/peers.py``): each one's step differs from plain LoRA's, the Riemannian one's
beyond its scalar twin (each r x r preconditioner replaced by its closest c*I)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipelines.params import parse_params
from trainers.base_model import resolve_base_model
from trainers.config import LoraPlusParams, RiemannianParams
from trainers.engines import build_peft
from trainers.probe.peers import riemannian_inverses, scalar_riemannian
from trainers.probe.verdict import EFFECTIVE, decide, reasons
from trainers.sft import ordered_examples

PARAMS = parse_params({"model": {"source": "tiny"}, "lora": {"r": 4, "alpha": 8},
                       "train": {"max_steps": 4, "per_device_batch_size": 2, "warmup_steps": 0},
                       "probe": {"steps": 3}})


@pytest.mark.parametrize("config", [RiemannianParams(kind="riemannian"), LoraPlusParams(kind="loraplus")],
                         ids=lambda c: c.kind)
def test_each_peer_changes_plain_lora_s_update(config, tmp_path: Path):
    from trainers.probe.peers import peer_setup

    torch.manual_seed(0)
    engine = build_peft(resolve_base_model(PARAMS.model), PARAMS)
    rows = [{"prompt": f"Question {i}: how long do I bake loaf number {i}?",
             "response": f"Bake loaf {i} for {20 + i} minutes, then let it cool."} for i in range(16)]
    examples = ordered_examples(rows, engine.tokenizer, 3 * 2, 0)
    measured, control, peer = peer_setup(config.kind, engine.model, engine.tokenizer, examples, PARAMS.train,
                                         config, PARAMS.probe, tmp_path)
    verdict, checks = decide(measured, PARAMS.probe)
    assert verdict == EFFECTIVE, reasons(checks)
    assert control.losses[0] == peer.losses[0]                  # same adapter, same first batch
    assert peer.lora_optimizer == config.kind and control.lora_optimizer is None
    passed = {c.name for c in checks if c.passed}
    if config.kind == "riemannian":
        assert {"attached", "readiness", "preconditioner_shape", "update", "beyond_scalar"} <= passed
        # Adam cancels a scalar preconditioner: the twin steps (almost) where plain LoRA does, as
        # the twin's own update against the control's says directly
        assert all(abs(m.scalar_update.cosine - m.update.cosine) < 0.01 for m in measured.modules)
        assert all(m.twin_update.cosine > 0.99 for m in measured.modules)
    else:
        assert passed == {"attached", "optimizer_window", "update"}
        assert all(m.update.norm_ratio > 2 for m in measured.modules)      # B steps 16 times as far


def test_the_scalar_twin_replaces_each_preconditioner_by_its_closest_multiple_of_identity():
    torch.manual_seed(0)
    A, B = torch.randn(4, 32), torch.randn(24, 4)
    shaped = riemannian_inverses(A, B, 0.01)
    torch.testing.assert_close(shaped["B"], torch.linalg.pinv(A @ A.T + 0.01 * torch.eye(4)))
    with scalar_riemannian():
        scalar = riemannian_inverses(A, B, 0.01)
    for side in ("A", "B"):
        c = torch.diagonal(shaped[side]).mean()
        torch.testing.assert_close(scalar[side], c * torch.eye(4))
    torch.testing.assert_close(riemannian_inverses(A, B, 0.01)["A"], shaped["A"])    # restored on leaving
