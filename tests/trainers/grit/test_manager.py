"""GritManager on a tiny random Llama: capture, preconditioning, equivalence, truncation, resume."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_lora import batches, tiny_lora_model

from trainers.grit import GritError, GritManager, GritParams
from trainers.grit import math as gm

MODULE = "base_model.model.model.layers.0.self_attn.q_proj"
# With one token, attention is a softmax over one key, identically 1: q_proj and k_proj get an
# exactly zero output gradient (only rounding noise, on some CPUs none), so single-token factor
# checks take a module whose output reaches the loss.
ONE_TOKEN_MODULE = "base_model.model.model.layers.0.self_attn.o_proj"


def lora_params(model):
    return [p for n, p in model.named_parameters() if "lora_" in n]


def run_steps(model, optimizer, step_batches) -> list[float]:
    losses = []
    for batch in step_batches:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def train(model, config: GritParams | None, steps: int, lr: float = 1e-2, max_grad_norm: float = 1.0):
    """Plain AdamW when ``config`` is None, else the GRIT-wrapped optimizer; returns losses."""
    optimizer = torch.optim.AdamW(lora_params(model), lr=lr, weight_decay=0.0)
    manager = None
    if config is not None:
        manager = GritManager(model, config)
        optimizer = manager.wrap_optimizer(optimizer, max_grad_norm=max_grad_norm)
    losses = []
    for batch in batches(steps):
        loss = model(**batch).loss
        loss.backward()
        if manager is None:
            torch.nn.utils.clip_grad_norm_(lora_params(model), max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, manager, optimizer


def test_single_token_factors_are_the_exact_outer_products():
    model = tiny_lora_model(random_B=True)
    # graft_norm=False: the plain natural gradient, whose exact value is checked at the end
    manager = GritManager(model, GritParams(min_samples=1, damping=0.1, damping_mode="absolute", graft_norm=False))
    layer = manager.modules[ONE_TOKEN_MODULE].layer
    seen = {}
    layer.lora_A["default"].register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0].detach()))

    def keep_output_grad(module, args, output):  # returns None: the output is left as it is
        output.register_hook(lambda g: seen.__setitem__("g", g))

    layer.register_forward_hook(keep_output_grad)
    # exactly one token row: next-token loss of a one-token sequence
    logits = model(input_ids=torch.tensor([[5]]), attention_mask=torch.tensor([[1]])).logits
    torch.nn.functional.cross_entropy(logits[0, -1:], torch.tensor([7])).backward()
    manager.sync_factors()
    A = layer.lora_A["default"].weight.detach()
    B = layer.lora_B["default"].weight.detach()
    x, g = seen["x"].reshape(-1, A.shape[1]), seen["g"].reshape(-1, B.shape[0])
    u, v = x @ A.T, g @ B  # u = A x, v = B^T g, each [1, r]
    sigma_u, sigma_v, rows = manager.covariances(ONE_TOKEN_MODULE)
    assert rows == 1 and float(v.abs().sum()) > 0
    assert torch.allclose(sigma_u, torch.outer(u[0], u[0]), atol=1e-6)
    assert torch.allclose(sigma_v, torch.outer(v[0], v[0]), rtol=1e-4, atol=1e-12)
    # and for one token the exact Fisher of vec(B) is (u u^T) kron (g g^T)
    s = float(layer.scaling["default"])
    grad_B = layer.lora_B["default"].weight.grad
    assert torch.allclose(grad_B, s * torch.outer(g[0], u[0]), atol=1e-7)
    vec = grad_B.T.reshape(-1)  # column-major vec
    fisher = torch.kron(torch.outer(u[0], u[0]), torch.outer(g[0], g[0])) * s**2
    assert torch.allclose(torch.outer(vec, vec), fisher, rtol=1e-4, atol=1e-12)

    grad_A = layer.lora_A["default"].weight.grad.clone()
    grad_B = layer.lora_B["default"].weight.grad.clone()
    manager.refresh_inverses(force=True)
    manager.engine.precondition()
    eye = torch.eye(A.shape[0])
    expected_B = torch.linalg.solve(sigma_u + 0.1 * eye, grad_B.T).T   # grad_B (Su + lI)^-1
    expected_A = torch.linalg.solve(sigma_v + 0.1 * eye, grad_A)       # (Sv + lI)^-1 grad_A
    assert float(grad_A.abs().sum()) > 0 and float(grad_B.abs().sum()) > 0   # not vacuous: 0 = 0 holds too
    assert torch.allclose(layer.lora_B["default"].weight.grad, expected_B, atol=1e-5)
    assert torch.allclose(layer.lora_A["default"].weight.grad, expected_A, atol=1e-5)


def test_padding_rows_are_not_captured():
    model = tiny_lora_model()
    manager = GritManager(model, GritParams())
    batch = batches(1)[0]
    model(**batch).loss.backward()
    manager.sync_factors()
    assert all(s.u.count == int(batch["attention_mask"].sum()) for s in manager.modules.values())


def test_disabled_grit_reproduces_plain_lora_adamw_exactly():
    plain, grit = tiny_lora_model(), tiny_lora_model()
    losses_plain, _, _ = train(plain, None, 5)
    losses_grit, manager, _ = train(grit, GritParams(precondition=False, reprojection=False), 5)
    assert losses_plain == losses_grit
    for (name, a), (_, b) in zip(plain.named_parameters(), grit.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    assert manager.step == 5 and all(s.u.count > 0 for s in manager.modules.values())


def test_preconditioning_changes_the_update_after_adamw():
    start = tiny_lora_model()
    plain, grit = copy.deepcopy(start), copy.deepcopy(start)
    config = GritParams(min_samples=8, update_freq=1)
    train(plain, None, 3)
    _, manager, _ = train(grit, config, 3)
    assert manager.all_ready(), manager.diagnostics()
    def delta_W(model, name):
        """The adapter's total update on dW = B A (scaling is the same in both runs)."""
        layer, initial = dict(model.named_modules())[name], dict(start.named_modules())[name]
        return (layer.lora_B["default"].weight @ layer.lora_A["default"].weight
                - initial.lora_B["default"].weight @ initial.lora_A["default"].weight)

    cosines = [gm.cosine(delta_W(plain, name), delta_W(grit, name)) for name in manager.modules]
    assert min(cosines) < 0.999, cosines


def test_clipping_bounds_the_natural_gradient():
    model = tiny_lora_model(random_B=True)
    manager = GritManager(model, GritParams(min_samples=1, update_freq=1, graft_norm=False))
    model(**batches(1)[0]).loss.backward()
    report = manager.before_step(max_grad_norm=1e-3)
    after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in manager.lora_parameters()]))
    assert report["preconditioned_tensors"] == 2 * len(manager.modules)
    assert report["grad_norm_preconditioned"] > 1e-3 and report["grad_norm_preconditioned"] != report["grad_norm_raw"]
    assert float(after) == pytest.approx(1e-3, rel=1e-4)


def test_readiness_is_per_module_and_side():
    model = tiny_lora_model()  # B = 0: the v-side statistics are all zero at first
    manager = GritManager(model, GritParams(min_samples=1))
    model(**batches(1)[0]).loss.backward()
    manager.before_step(1.0)
    diagnostics = manager.diagnostics()
    assert all(d["inverse_ready_B"] and not d["inverse_ready_A"] for d in diagnostics.values())
    assert not manager.all_ready()


def test_truncation_keeps_the_function_and_k_equal_r_is_identity():
    model = tiny_lora_model(random_B=True)
    _, manager, optimizer = train(model, GritParams(min_samples=8), 2)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    manager.reproject(k=4)  # k = r
    for name, parameter in model.named_parameters():
        if "lora_" in name:
            assert torch.allclose(parameter, before[name], atol=1e-5), name

    manager.reproject(k=2)  # changes the function (that is reprojection) ...
    batch = batches(1, seed=9)[0]
    with torch.no_grad():
        reprojected = model(**batch).logits
    manager.truncate()      # ... and truncation to the same basis does not
    with torch.no_grad():
        truncated = model(**batch).logits
    assert torch.allclose(reprojected, truncated, atol=1e-5)
    assert set(manager.effective_ranks().values()) == {2}
    state = manager.modules[MODULE]
    assert state.lora_A.weight.shape[0] == 2 and state.lora_B.weight.shape[1] == 2
    assert optimizer.state[state.lora_A.weight]["exp_avg"].shape == (2, 32)
    loss = model(**batch).loss  # training continues on the smaller factors
    loss.backward()
    optimizer.step()
    assert torch.isfinite(state.lora_A.weight).all()


def test_resume_from_checkpoint_matches_an_uninterrupted_run(tmp_path):
    config = GritParams(min_samples=8, update_freq=2)
    full_losses, full_manager, _ = train(tiny_lora_model(), config, 6)

    model = tiny_lora_model()
    optimizer = torch.optim.AdamW(lora_params(model), lr=1e-2, weight_decay=0.0)
    manager = GritManager(model, config)
    wrapped = manager.wrap_optimizer(optimizer, max_grad_norm=1.0)
    all_batches = batches(6)
    losses = run_steps(model, wrapped, all_batches[:3])
    torch.save({"lora": {n: p for n, p in model.named_parameters() if "lora_" in n},
                "optimizer": optimizer.state_dict(), "grit": manager.state_dict()}, tmp_path / "ckpt.pt")
    del model, optimizer, manager, wrapped  # the "kill"

    checkpoint = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    model = tiny_lora_model()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(checkpoint["lora"][name])
    optimizer = torch.optim.AdamW(lora_params(model), lr=1e-2, weight_decay=0.0)
    optimizer.load_state_dict(checkpoint["optimizer"])
    manager = GritManager(model, config)
    manager.load_state_dict(checkpoint["grit"])
    wrapped = manager.wrap_optimizer(optimizer, max_grad_norm=1.0)
    losses += run_steps(model, wrapped, all_batches[3:])
    assert losses == full_losses
    for name, state in manager.modules.items():
        reference = full_manager.modules[name]
        assert torch.equal(state.lora_A.weight, reference.lora_A.weight)
        assert torch.equal(state.lora_B.weight, reference.lora_B.weight)


def test_bypassed_capture_fails_loudly_at_the_first_step():
    model = tiny_lora_model()
    manager = GritManager(model, GritParams())
    bypassed = manager.modules[MODULE]
    # what a fused kernel does: read the LoRA weights directly, never calling lora_A's forward
    bypassed.layer.forward = lambda x, *a, **k: bypassed.layer.base_layer(x) + (
        x @ bypassed.lora_A.weight.T @ bypassed.lora_B.weight.T) * bypassed.scaling
    model(**batches(1)[0]).loss.backward()
    with pytest.raises(GritError, match=r"captured 0 token rows on 1/14 LoRA modules"):
        manager.before_step(1.0)


def test_graft_norm_keeps_each_raw_gradient_norm():
    model = tiny_lora_model(random_B=True)
    manager = GritManager(model, GritParams(min_samples=1, graft_norm=True))
    model(**batches(1)[0]).loss.backward()
    raw = {id(p): p.grad.norm().item() for p in manager.lora_parameters()}
    before = {id(p): p.grad.clone() for p in manager.lora_parameters()}
    manager.sync_factors()
    manager.refresh_inverses(force=True)
    assert manager.engine.precondition() == 2 * len(manager.modules)
    for parameter in manager.lora_parameters():
        assert parameter.grad.norm().item() == pytest.approx(raw[id(parameter)], rel=1e-5)
    assert any(gm.cosine(p.grad, before[id(p)]) < 0.999 for p in manager.lora_parameters())
