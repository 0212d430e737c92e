"""GRIT's peers (``trainers/lora_optimizers.py``): PEFT's Riemannian-preconditioned LoRA and LoRA+
are built with the right parameter groups from the optimizer class ``train.optim`` chooses, their
step is not plain LoRA's, and the Trainer steps them when a variant declares one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft.optimizers.riemannian import _collect_lora_pairs

from pipelines.params import parse_params
from tests.tiny_lora import batches, tiny_lora_model
from trainers.base_model import resolve_base_model
from trainers.config import LoraPlusParams, RiemannianParams, VariantParams, preconditioner, probed_methods
from trainers.engines import build_peft
from trainers.lora_optimizers import build_lora_optimizer, innermost_optimizer, lora_optimizer_kind
from trainers.recipe import GritAttachment, build_trainer
from trainers.sft import ordered_examples

ADAMW = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8}
RIEMANNIAN, LORAPLUS = RiemannianParams(kind="riemannian"), LoraPlusParams(kind="loraplus")


def trainable(model) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def test_riemannian_preconditions_every_lora_pair_and_keeps_one_group():
    model = tiny_lora_model(random_B=True)
    optimizer = build_lora_optimizer(model, RIEMANNIAN, torch.optim.AdamW, ADAMW, weight_decay=0.1)
    assert lora_optimizer_kind(optimizer) == "riemannian" and isinstance(optimizer, torch.optim.AdamW)
    (group,) = optimizer.param_groups
    assert {id(p) for p in group["params"]} == {id(p) for p in trainable(model).values()}
    assert group["lr"] == 1e-3 and group["weight_decay"] == 0.1
    assert len(_collect_lora_pairs(model)) == 2 * 7        # every targeted module of both blocks


def test_loraplus_gives_B_sixteen_times_A_s_learning_rate():
    model = tiny_lora_model()
    optimizer = build_lora_optimizer(model, LORAPLUS, torch.optim.AdamW, ADAMW, weight_decay=0.1)
    assert lora_optimizer_kind(optimizer) == "loraplus" and LORAPLUS.lr_ratio == 16.0
    rate = {id(p): (group["lr"], group["weight_decay"]) for group in optimizer.param_groups for p in group["params"]}
    params = trainable(model)
    assert {rate[id(p)] for n, p in params.items() if "lora_A" in n} == {(1e-3, 0.1)}
    assert {rate[id(p)] for n, p in params.items() if "lora_B" in n} == {(16e-3, 0.1)}
    assert len(rate) == len(params)


def one_step(config, optimizer_cls=torch.optim.AdamW, kwargs=ADAMW) -> tuple[dict, dict, dict]:
    """(factors before, after one step, gradients) of a tiny LoRA model with B != 0."""
    model = tiny_lora_model(random_B=True)
    before = {n: p.detach().clone() for n, p in trainable(model).items()}
    optimizer = (optimizer_cls(list(trainable(model).values()), weight_decay=0.0, **kwargs) if config is None
                 else build_lora_optimizer(model, config, optimizer_cls, kwargs, weight_decay=0.0))
    model(**batches(1)[0]).loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainable(model).items()}
    optimizer.step()
    return before, {n: p.detach().clone() for n, p in trainable(model).items()}, grads


@pytest.mark.parametrize("config", [RIEMANNIAN, LORAPLUS], ids=lambda c: c.kind)
def test_one_step_is_not_plain_adamw_lora_s(config):
    before, plain, _ = one_step(None)
    _, peer, _ = one_step(config)
    moved = {n: (peer[n] - before[n]).norm() / (plain[n] - before[n]).norm() for n in before}
    changed_A = [n for n in before if "lora_A" in n and not torch.allclose(peer[n], plain[n], atol=1e-9)]
    changed_B = [n for n in before if "lora_B" in n and not torch.allclose(peer[n], plain[n], atol=1e-9)]
    assert len(changed_B) == 14                               # every module's B steps elsewhere
    if config.kind == "loraplus":                             # B's step 16 times as long, A's unchanged
        assert not changed_A
        assert all(abs(float(moved[n]) - 16.0) < 1e-3 for n in changed_B)
    else:                                                     # both factors' gradients are turned
        assert len(changed_A) == 14


def test_riemannian_step_is_the_preconditioned_gradient():
    """Under SGD the step is -lr times what the optimizer consumed: g_A <- (B^T B + reg I)^-1 g_A,
    g_B <- g_B (A A^T + reg I)^-1."""
    before, after, grads = one_step(RIEMANNIAN, torch.optim.SGD, {"lr": 0.5})
    eye = torch.eye(4)
    for name in (n for n in before if "lora_A" in n):
        b_name = name.replace("lora_A", "lora_B")
        A, B = before[name], before[b_name]
        expected_A = torch.linalg.pinv(B.T @ B + 0.01 * eye) @ grads[name]
        expected_B = grads[b_name] @ torch.linalg.pinv(A @ A.T + 0.01 * eye)
        torch.testing.assert_close(after[name], A - 0.5 * expected_A, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(after[b_name], B - 0.5 * expected_B, rtol=1e-4, atol=1e-6)


def test_a_variant_declares_its_peer_in_params_and_not_with_grit():
    variant = VariantParams.model_validate({"engine": "peft", "lora_optimizer": {"kind": "loraplus"}})
    assert variant.lora_optimizer == LORAPLUS and preconditioner(variant) == "loraplus"
    assert preconditioner(VariantParams(engine="peft")) is None
    assert preconditioner(VariantParams(engine="peft", grit=True)) == "grit"
    # the methods whose study parts end with a probe: a preconditioner, in the methods' order
    variants = {"plain": VariantParams(engine="peft"), "peer": variant, "grit": VariantParams(engine="peft", grit=True)}
    assert probed_methods(["grit", "plain", "peer", "undeclared"], variants) == ["grit", "peer"]
    with pytest.raises(ValueError, match="GRIT wraps the Trainer's optimizer"):
        VariantParams.model_validate({"engine": "peft", "grit": True, "lora_optimizer": {"kind": "riemannian"}})
    with pytest.raises(ValueError, match="lr_ratio"):
        VariantParams.model_validate({"engine": "peft", "lora_optimizer": {"kind": "riemannian", "lr_ratio": 4}})


@pytest.mark.parametrize(("optim", "config", "expected"), [
    ("adamw_torch", RIEMANNIAN, torch.optim.AdamW), ("sgd", LORAPLUS, torch.optim.SGD)], ids=["riemannian", "loraplus"])
def test_the_trainer_steps_the_variant_s_peer_built_from_train_optim(optim, config, expected, tmp_path: Path):
    params = parse_params({"model": {"source": "tiny"}, "lora": {"r": 4, "alpha": 8},
                           "train": {"max_steps": 2, "per_device_batch_size": 2, "warmup_steps": 0, "optim": optim},
                           "probe": {"steps": 2}})
    torch.manual_seed(0)
    engine = build_peft(resolve_base_model(params.model), params)
    rows = [{"prompt": f"Question {i}?", "response": f"Answer {i}."} for i in range(8)]
    examples = ordered_examples(rows, engine.tokenizer, 4, 0)
    trainer = build_trainer(engine.model, engine.tokenizer, examples, params.train, tmp_path, GritAttachment(), [],
                            checkpoints=False, progress=False, lora_optimizer=config)
    trainer.train()
    assert trainer.state.global_step == 2
    assert isinstance(innermost_optimizer(trainer.optimizer), expected)
    assert lora_optimizer_kind(trainer.optimizer) == config.kind
