"""GRIT's fused LoRA functions (trainers/grit/fused.py): correct gradients (gradcheck), bit for bit
PEFT's own LoRA gradients and GRIT's statistics in fp32 on CPU, the rows GRIT captures from
their backward, the same on bitsandbytes' NF4 base, and the fallback to hooks where a layer cannot
be fused."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from tests.tiny_lora import TARGETS, batches, lora_grads, tiny_base_model, tiny_lora_model
from trainers.grit import GritManager, GritParams
from trainers.grit.fused import FusedLoraLinear, FusedLoraSwiGLU, unfusable_reason


def _rand(*shape, dtype=torch.float64, grad=True):
    return torch.randn(*shape, dtype=dtype).requires_grad_(grad)


def test_the_fused_functions_pass_gradcheck():
    torch.manual_seed(0)
    x, W, b, A, B = _rand(2, 3, 5), _rand(4, 5), _rand(4), _rand(2, 5), _rand(4, 2)
    taps = []
    assert torch.autograd.gradcheck(lambda *t: FusedLoraLinear.apply(*t, 0.75, lambda u, g, lead: taps.append(1)),
                                    (x, W, b, A, B))
    assert taps, "the tap ran in backward"
    x = _rand(2, 3, 5)
    gate = (_rand(6, 5), None, _rand(2, 5), _rand(6, 2))
    up = (_rand(6, 5), _rand(6), _rand(2, 5), _rand(6, 2))
    down = (_rand(5, 6), None, _rand(2, 6), _rand(5, 2))

    def mlp(x, gW, gA, gB, uW, ub, uA, uB, dW, dA, dB):
        return FusedLoraSwiGLU.apply(x, gW, None, gA, gB, uW, ub, uA, uB, dW, None, dA, dB, (0.5, 2.0, 1.5),
                                     (None, None, None))

    tensors = (x, gate[0], gate[2], gate[3], *up, down[0], down[2], down[3])
    assert torch.autograd.gradcheck(mlp, tensors)


def _peft_layer(module: nn.Module, seed: int = 0):
    torch.manual_seed(seed)
    model = get_peft_model(module, LoraConfig(r=4, lora_alpha=8, target_modules=["proj", "gate_proj", "up_proj",
                                                                                 "down_proj"]))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(parameter, std=0.1)
    return model


class _One(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 12, bias=True)

    def forward(self, x):
        return self.proj(x)


def test_a_fused_projection_is_peft_bit_for_bit_with_the_rows_grit_captures():
    """Output, input gradient, LoRA gradients, and the (u, dL/du) handed to GRIT equal PEFT's
    forward and autograd's gradient at u, bit for bit in fp32 (scaling 2)."""
    model = _peft_layer(_One())
    layer = model.base_model.model.proj
    x = torch.randn(3, 7, 16, requires_grad=True)
    seen = {}

    def remember(_module, _inputs, out):
        seen["u"] = out
        out.register_hook(lambda grad: seen.update(grad_u=grad))

    layer.lora_A["default"].register_forward_hook(remember)
    reference = model(x)
    reference.square().sum().backward()
    expected, expected_dx = lora_grads(model), x.grad.clone()
    model.zero_grad(), x.grad.zero_()
    taps = []
    w = (layer.base_layer.weight, layer.base_layer.bias, layer.lora_A["default"].weight,
         layer.lora_B["default"].weight)
    fused = FusedLoraLinear.apply(x, *w, 2.0, lambda u, g, lead: taps.append((u, g, lead)))
    fused.square().sum().backward()
    assert torch.equal(fused, reference) and torch.equal(x.grad, expected_dx)
    assert all(torch.equal(p.grad, expected[n]) for n, p in model.named_parameters() if n in expected)
    (u, grad_u, lead), = taps
    assert lead == x.shape[:-1], "the tap is told the input's leading shape, to line the rows up with a mask"
    # as token rows [N, r]: the same values as PEFT's u [..., r]
    assert torch.equal(u, seen["u"].reshape(u.shape)) and torch.equal(grad_u, seen["grad_u"].reshape(u.shape))


def test_the_fused_mlp_is_peft_bit_for_bit():
    config = LlamaConfig(hidden_size=16, intermediate_size=24, hidden_act="silu", num_attention_heads=4,
                         num_key_value_heads=2)
    model = _peft_layer(LlamaMLP(config))
    x = torch.randn(2, 5, 16, requires_grad=True)
    model(x).square().sum().backward()
    expected, expected_dx = lora_grads(model), x.grad.clone()
    model.zero_grad(), x.grad.zero_()
    manager = GritManager(model, GritParams(capture="fused"))
    assert set(manager.capture_paths.values()) == {"fused-swiglu"}
    out = model(x)
    out.square().sum().backward()
    assert torch.equal(x.grad, expected_dx)
    assert all(torch.equal(p.grad, expected[n]) for n, p in model.named_parameters() if n in expected)
    manager.detach()
    assert all("forward" not in m.__dict__ for m in model.modules()), "detach restores every forward"


def _one_step(capture: str, **grit):
    model = tiny_lora_model(seed=0, random_B=True)
    manager = GritManager(model, GritParams(capture=capture, min_samples=8, update_freq=1, **grit))
    optimizer = manager.wrap_optimizer(torch.optim.AdamW([p for p in model.parameters() if p.requires_grad]), 1.0)
    model(**batches(1)[0]).loss.backward()
    manager.before_step(1.0)
    return model, manager, optimizer


def test_the_last_block_gets_the_hooks_paths_statistics_and_preconditioned_gradients_bit_for_bit():
    """Same weights, same batch: the last block (whose upstream gradient is the same on both
    paths) has bit-identical statistics and preconditioned gradients; earlier blocks differ only
    in how q, k and v's input gradients are summed (last bits), so they agree to fp32 rounding."""
    hooks, hooks_manager, _ = _one_step("hooks")
    fused, fused_manager, _ = _one_step("fused")
    assert fused_manager.report["preconditioned_tensors"] == hooks_manager.report["preconditioned_tensors"] > 0
    for key, state in fused_manager.modules.items():
        reference = hooks_manager.modules[key]
        same = torch.equal if ".layers.1." in key else (lambda a, b: torch.allclose(a, b, rtol=1e-5, atol=1e-7))
        assert state.u.count == reference.u.count > 0
        assert same(state.u.total, reference.u.total) and same(state.v.total, reference.v.total), key
        for side in ("A", "B"):
            assert same(state.weight(side).grad, reference.weight(side).grad), (key, side)


def _bf16_model_with_fp32_adapters():
    """PEFT's default in a bf16 model: the adapters autocast to fp32 (``autocast_adapter_dtype``)."""
    model = get_peft_model(tiny_base_model(0).to(torch.bfloat16),
                           LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS), autocast_adapter_dtype=True)
    torch.manual_seed(1)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(parameter, std=0.05)
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
    return model


def _grit_step(model, **grit):
    manager = GritManager(model, GritParams(min_samples=8, **grit))
    loss = model(**batches(1)[0]).loss
    loss.backward()
    manager.sync_factors()
    return loss, lora_grads(model), manager


def test_on_fp32_adapters_in_a_bf16_model_the_fused_functions_compute_as_peft_does():
    """PEFT runs the LoRA path in the adapters' fp32 (the input cast up, the sum cast back);
    Unsloth's fused LoRA runs it in bf16. With ``fused_lora_dtype: adapter`` (the PEFT engine's)
    the loss, the last block's LoRA gradients and GRIT's statistics are PEFT's bit for bit (the
    first block's differ only in how q, k and v's input gradients are summed, in bf16); with
    ``input`` (Unsloth's) the last block's gradients are bf16 math, percents away."""
    loss, expected, hooks = _grit_step(_bf16_model_with_fp32_adapters(), capture="hooks")
    fused_loss, grads, fused = _grit_step(_bf16_model_with_fp32_adapters(), capture="fused",
                                          fused_lora_dtype="adapter")
    assert set(fused.capture_paths.values()) == {"fused-linear", "fused-swiglu"}
    assert torch.equal(fused_loss, loss)
    last = [name for name in expected if ".layers.1." in name]
    assert last and all(torch.equal(grads[name], expected[name]) for name in last)

    def near(a, b):            # bf16 rounding of a sum, relative to the tensor's scale
        return float((a - b).abs().max()) <= 2e-2 * float(b.abs().max())

    for key, state in fused.modules.items():
        same = torch.equal if ".layers.1." in key else near
        assert same(state.u.total, hooks.modules[key].u.total) and same(state.v.total, hooks.modules[key].v.total)
    assert all(near(grads[name], expected[name]) for name in expected)
    _, bf16_grads, _ = _grit_step(_bf16_model_with_fp32_adapters(), capture="fused", fused_lora_dtype="input")
    worst = max(float((bf16_grads[n] - expected[n]).abs().max() / expected[n].abs().max()) for n in last)
    assert worst > 1e-3, "Unsloth's numerics are bf16 LoRA math, not PEFT's"


def test_every_module_captures_through_the_fused_functions_and_nothing_on_a_step_that_does_not_capture():
    model, manager, optimizer = _one_step("fused", capture_every=2)
    assert set(manager.capture_paths.values()) == {"fused-linear", "fused-swiglu"} and not manager.notes
    assert manager.report["capture_coverage"] == 1.0
    optimizer.inner.step(), manager.after_step(optimizer.inner), optimizer.zero_grad()
    assert not manager.capturing
    model(**batches(2)[1]).loss.backward()
    assert manager.capture.stash.grads == [], "no tap on a step that does not capture"


def test_gradient_checkpointing_counts_each_row_once():
    plain = _one_step("fused")[1]
    model = tiny_lora_model(seed=0, random_B=True)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    manager = GritManager(model, GritParams(capture="fused", min_samples=8, update_freq=1))
    model(**batches(1)[0]).loss.backward()
    manager.sync_factors()
    for key, state in manager.modules.items():
        assert state.u.count == plain.modules[key].u.count
        assert torch.allclose(state.u.total, plain.modules[key].u.total, rtol=1e-5, atol=1e-7)


def test_a_layer_that_cannot_be_fused_keeps_the_hooks_and_says_so():
    torch.manual_seed(0)
    model = get_peft_model(tiny_base_model(), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=TARGETS))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert unfusable_reason(layer, "default") == "LoRA dropout"
    manager = GritManager(model, GritParams(capture="fused", min_samples=8))
    assert set(manager.capture_paths.values()) == {"hooks"}
    assert len(manager.notes) == 1 and "cannot run on 14/14 modules" in manager.notes[0]
    model(**batches(1)[0]).loss.backward()
    manager.sync_factors()
    assert all(state.u.count > 0 for state in manager.modules.values())


def _nf4_base_and_its_dequantized_twin(seed: int = 0):
    """The tiny Llama with every projection GRIT targets in bitsandbytes' NF4 (quantised on the
    CPU), and the same Llama whose projections are plain Linears holding the dequantised NF4
    weights: the per-module reference the NF4 path must reproduce."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    nf4, twin = tiny_base_model(seed), tiny_base_model(seed)
    for name, linear in [(n, m) for n, m in nf4.named_modules() if n.rsplit(".", 1)[-1] in TARGETS]:
        quantised = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                      compute_dtype=torch.float32, quant_type="nf4")
        quantised.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type="nf4")
        quantised = quantised.to("cpu")                      # the move quantises
        parent, child = name.rsplit(".", 1)
        setattr(nf4.get_submodule(parent), child, quantised)
        twin.get_submodule(name).weight.data = dequantize_4bit(quantised.weight.data, quantised.weight.quant_state)
    return nf4, twin


def _hybrid_grit_step(base, capture: str = "auto"):
    """One GRIT step as the hybrid attaches it (the Unsloth engine's capture, "auto": fused,
    Unsloth's numerics), on LoRA adapters seeded alike whatever the base's layers are."""
    from trainers.config import VariantParams, variant_grit

    torch.manual_seed(1)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(parameter, std=0.05)
    config = variant_grit(GritParams(min_samples=8, update_freq=1, capture=capture),
                          VariantParams(engine="unsloth", grit=True))
    manager = GritManager(model, config)
    manager.wrap_optimizer(torch.optim.AdamW([p for p in model.parameters() if p.requires_grad]), 1.0)
    loss = model(**batches(1)[0]).loss
    loss.backward()
    manager.before_step(1.0)
    return loss, manager


def test_on_an_nf4_base_the_hybrids_grit_runs_its_fused_functions_as_on_the_dequantized_weights():
    """On bitsandbytes' NF4 layers the hybrid's GRIT runs its fused functions, de-quantising the
    packed weight for each product: loss, statistics and preconditioned gradients are bit for bit
    those of the fused path on a plain Linear base holding the de-quantised weights (fp32, CPU),
    and agree with PEFT's own 4-bit forward with GRIT's hooks (the per-module reference, which
    sums its products in another order)."""
    nf4, twin = _nf4_base_and_its_dequantized_twin()
    q_proj = "model.layers.0.self_attn.q_proj"
    assert not torch.equal(twin.get_submodule(q_proj).weight, tiny_base_model(0).get_submodule(q_proj).weight), \
        "the reference holds the NF4 weights, not the fp32 ones"
    loss, fused = _hybrid_grit_step(nf4)
    twin_loss, on_twin = _hybrid_grit_step(twin)
    hooks_loss, hooks = _hybrid_grit_step(_nf4_base_and_its_dequantized_twin()[0], capture="hooks")
    assert type(fused.model.get_submodule(f"base_model.model.{q_proj}").base_layer).__name__ == "Linear4bit"
    assert set(fused.capture_paths.values()) == set(on_twin.capture_paths.values()) == {"fused-linear", "fused-swiglu"}
    assert fused.notes == [] and set(hooks.capture_paths.values()) == {"hooks"}
    assert torch.equal(loss, twin_loss) and torch.allclose(loss, hooks_loss, rtol=1e-6)
    assert fused.report["preconditioned_tensors"] == on_twin.report["preconditioned_tensors"] == 28

    def near(a, b):
        return float((a - b).abs().max()) <= 1e-5 * float(b.abs().max())

    for key, state in fused.modules.items():
        assert state.u.count == on_twin.modules[key].u.count == hooks.modules[key].u.count > 0
        for mine, twins, reference in ((state.u.total, on_twin.modules[key].u.total, hooks.modules[key].u.total),
                                       (state.v.total, on_twin.modules[key].v.total, hooks.modules[key].v.total)):
            assert torch.equal(mine, twins) and near(mine, reference), key
        for side in ("A", "B"):
            grad = state.weight(side).grad
            assert torch.equal(grad, on_twin.modules[key].weight(side).grad), (key, side)
            assert near(grad, hooks.modules[key].weight(side).grad), (key, side)


def test_a_fused_projection_on_an_nf4_weight_is_peft_4bit_layer_with_no_dense_weight_saved():
    """One NF4 projection through the fused function: output and every gradient equal PEFT's
    4-bit LoRA layer (bitsandbytes' own matmul), and what autograd saves is the packed codes, not
    a de-quantised copy (the memory the fallback used to cost)."""
    nf4, _ = _nf4_base_and_its_dequantized_twin()
    torch.manual_seed(2)
    model = get_peft_model(nf4, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj"]))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    nn.init.normal_(layer.lora_B["default"].weight, std=0.1)
    x = torch.randn(2, 5, layer.base_layer.in_features, requires_grad=True)
    reference = layer(x)
    reference.square().sum().backward()
    expected_dx = x.grad.clone()
    expected = {side: getattr(layer, f"lora_{side}")["default"].weight.grad.clone() for side in ("A", "B")}
    model.zero_grad(), x.grad.zero_()
    weight = layer.base_layer.weight
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fused = FusedLoraLinear.apply(x, weight, None, layer.lora_A["default"].weight, layer.lora_B["default"].weight,
                                      float(layer.scaling["default"]), None, None, weight.quant_state)
    fused.square().sum().backward()
    assert torch.equal(fused, reference) and torch.equal(x.grad, expected_dx)
    assert all(torch.equal(getattr(layer, f"lora_{side}")["default"].weight.grad, expected[side]) for side in "AB")
    dense = layer.base_layer.out_features * layer.base_layer.in_features
    assert weight.dtype == torch.uint8 and weight.numel() == dense // 2
    assert not any(t.numel() == dense and t.dtype.is_floating_point for t in saved), "no dense weight saved"


def test_on_an_nf4_base_the_hybrids_forward_saves_what_it_saves_on_a_plain_base():
    """What the hybrid's forward saves for backward on an NF4 base is what it saves on the plain
    base of the de-quantised weights, byte for byte: the dense weight is de-quantised per product,
    never kept (the packed codes are a parameter, there anyway)."""
    from profiling.memory import saved_activation_bytes

    def saves(base) -> int:
        _, manager = _hybrid_grit_step(base)
        return saved_activation_bytes(lambda: manager.model(**batches(1)[0]).loss)

    nf4, twin = _nf4_base_and_its_dequantized_twin()
    assert saves(nf4) == saves(twin) > 0


def test_a_base_neither_linear_nor_4bit_keeps_the_hooks_and_says_why():
    class Scaled(nn.Linear):
        pass

    model = _peft_layer(_One())
    layer = model.base_model.model.proj
    layer.base_layer.__class__ = Scaled
    assert unfusable_reason(layer, "default") == "base layer is Scaled, not a plain Linear nor a quantised 4-bit Linear"


@pytest.mark.parametrize("engine, expected, lora_dtype", [("unsloth", "fused", "input"), ("peft", "hooks", "adapter")])
def test_capture_auto_is_fused_for_the_hybrid_and_hooks_for_pure_grit(engine, expected, lora_dtype):
    from trainers.config import VariantParams, variant_grit

    resolved = variant_grit(GritParams(), VariantParams(engine=engine, grit=True))
    assert resolved.capture == expected and resolved.fused_lora_dtype == lora_dtype
    assert variant_grit(GritParams(capture="hooks"), VariantParams(engine="unsloth", grit=True)).capture == "hooks"


@pytest.mark.slow
def test_the_fused_functions_survive_a_compiled_decoder_layer():
    """Unsloth compiles each decoder layer on CUDA, and a compiled layer skipped hooks registered
    after it was traced. GRIT's fused functions take their tap at call time: with every layer
    compiled (``aot_eager`` on CPU), each module still hands over its rows, the same as uncompiled.
    (The hybrid still declines Unsloth's compile until the GPU check shows it there.)"""
    compiled = tiny_lora_model(seed=0, random_B=True)
    manager = GritManager(compiled, GritParams(capture="fused", min_samples=8))
    for layer in compiled.base_model.model.model.layers:
        layer.forward = torch.compile(layer.forward, backend="aot_eager")
    compiled(**batches(1)[0]).loss.backward()
    manager.sync_factors()
    plain = _one_step("fused")[1]
    for key, state in manager.modules.items():
        assert state.u.count == plain.modules[key].u.count > 0
        assert torch.allclose(state.u.total, plain.modules[key].u.total, rtol=1e-5, atol=1e-6)
        assert torch.allclose(state.v.total, plain.modules[key].v.total, rtol=1e-5, atol=1e-9)
