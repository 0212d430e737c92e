"""GRIT's own fused LoRA functions: the base matmul and the LoRA path in one autograd function
that saves only what Unsloth's fused LoRA saves, and whose backward hands GRIT the rank-space
rows it needs (u = A x and dL/du) without hooks.

Why: Unsloth's fused kernels never expose u nor the gradient at the LoRA output, so the hybrid
used to put PEFT's unfused forward back and hook it. That path keeps, per LoRA input, an fp32
copy (PEFT's adapter autocast), u for ``lora_B``, and in the MLP the activation's input and
output and the down projection's input: about 1.9x Unsloth's peak memory on the H100 check.
Here each function saves what Unsloth's ``LoRA_QKV`` / ``LoRA_W`` / ``LoRA_MLP`` save (the
input, and in the MLP the gate and up outputs e and g, recomputing h = silu(e) g in backward),
computes u and dL/du in backward where the LoRA gradients need them anyway, and stashes them for
the manager (``tap``): no added saved activation, no added operation in the step.

On a 4-bit base (bitsandbytes' NF4 or FP4 ``Linear4bit``, ``model.load_in_4bit``) the functions
take the packed weight and de-quantise it for each product that needs it, in the forward and
again in the backward, as Unsloth's 4-bit kernels do: the dense matrix is a temporary, never
saved, so the hybrid on an NF4 base saves what Unsloth's 4-bit LoRA saves.

Shapes: x [..., d_in], W [d_out, d_in], A [r, d_in], B [d_out, r], s the LoRA scaling;
u = x A^T [..., r], y = x W^T + s u B^T, dL/du = s dL/dy B, dL/dA = (dL/du)^T x,
dL/dB = s (dL/dy)^T u.
The LoRA path is computed in the input's dtype, as Unsloth's fused LoRA does (no fp32 copy of
the input), or in the adapter's, as PEFT's forward does (``lora_dtype``: the input cast to fp32
adapters in a bf16 model, the sum cast back; only the bf16 input is saved, the cast is redone in
backward). The gradients of A and B are returned in their own dtype. GRIT's statistics stay fp32
(``math.masked_outer_sum_batched`` folds the rows in fp32).
"""

from __future__ import annotations

import types
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trainers.grit.layer import REGISTRATIONS, lora_layers

# A tap: called in backward with (u, dL/du) of one module as token rows, both [N, r], and the
# leading shape of the module's input (whose product is N).
Tap = Callable[[torch.Tensor, torch.Tensor, torch.Size], None]


@dataclass(frozen=True)
class LoraWeights:
    """One LoRA linear layer's tensors for the active adapter, read at call time (truncation
    replaces A and B by new Parameters)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    lora_dtype: torch.dtype | None = None      # the LoRA path's dtype; None: the input's
    quant_state: object | None = None          # bitsandbytes' QuantState of a 4-bit ``weight``; None: dense


def dense_weight(weight: torch.Tensor, quant_state: object | None, dtype: torch.dtype) -> torch.Tensor:
    """The base weight [d_out, d_in] as a dense matrix in ``dtype``: a dense weight cast only where
    its dtype differs; bitsandbytes' packed 4-bit codes de-quantised for this one product (as
    bitsandbytes' own 4-bit matmul does, then cast to the product's dtype)."""
    if quant_state is None:
        return weight if weight.dtype == dtype else weight.to(dtype)
    from bitsandbytes.functional import dequantize_4bit  # only a 4-bit base imports bitsandbytes

    return dequantize_4bit(weight, quant_state).to(dtype)


def quant_state_of(weight: torch.Tensor) -> object | None:
    """bitsandbytes' QuantState of a 4-bit ``Params4bit`` weight (None: a dense weight)."""
    return getattr(weight, "quant_state", None)


# How the fused functions pick the LoRA path's dtype (GritParams.fused_lora_dtype).
LORA_DTYPES = ("input", "adapter")


class WeightReader:
    """One LoRA layer's tensors for ``adapter`` (``LoraWeights``), read through the modules'
    public attributes only when a parameter was registered since the last read (a truncation
    replaces A and B by new Parameters): an attribute lookup is a Python call, seven a module
    and 1,470 a forward on SmolLM2, on a host-bound GPU step. The scaling and the dtypes are
    read at every call, and all of it again for another layer (a copy of the model shares the
    forward it was given). ``lora_dtype``: "input" (Unsloth's numerics) or "adapter" (PEFT's: A's dtype)."""

    __slots__ = ("adapter", "layer", "lora_dtype", "seen", "tensors")

    def __init__(self, layer: nn.Module, adapter: str, lora_dtype: str = "adapter") -> None:
        self.layer, self.adapter, self.lora_dtype = layer, adapter, lora_dtype
        self.seen: int | None = None
        self.tensors: tuple = ()

    def __call__(self, layer: nn.Module) -> LoraWeights:
        adapter = self.adapter
        if self.seen != REGISTRATIONS[0] or layer is not self.layer:
            self.layer, self.seen = layer, REGISTRATIONS[0]
            weight = layer.base_layer.weight
            self.tensors = (weight, layer.base_layer.bias, layer.lora_A[adapter].weight,
                            layer.lora_B[adapter].weight, quant_state_of(weight))
        weight, bias, A, B, quant_state = self.tensors
        return LoraWeights(weight, bias, A, B, float(layer.scaling[adapter]),
                           A.dtype if self.lora_dtype == "adapter" else None, quant_state)


def unfusable_reason(layer: nn.Module, adapter: str) -> str | None:
    """Why this PEFT LoRA layer cannot take the fused function (None: it can). The fused
    function covers what Unsloth's does: a plain ``nn.Linear`` or bitsandbytes 4-bit base, one
    unmerged adapter, no dropout, no DoRA, no LoRA bias."""
    base = getattr(layer, "base_layer", None)
    four_bit = type(base).__name__ == "Linear4bit" and quant_state_of(base.weight) is not None
    if type(base) is not nn.Linear and not four_bit:
        return f"base layer is {type(base).__name__}, not a plain Linear nor a quantised 4-bit Linear"
    if getattr(layer, "merged_adapters", None):
        return "adapter merged"
    if getattr(layer, "disable_adapters", False):
        return "adapters disabled"
    if list(getattr(layer, "active_adapters", [adapter])) != [adapter]:
        return "several active adapters"
    dropout = layer.lora_dropout[adapter]
    if not isinstance(dropout, nn.Identity) and getattr(dropout, "p", 0.0) > 0:
        return "LoRA dropout"
    if getattr(layer, "use_dora", {}).get(adapter, False):
        return "DoRA"
    if getattr(layer, "lora_bias", {}).get(adapter, False):
        return "LoRA bias"
    return None


# ------------------------------------------------------------------------ the math, as functions
#
# On rows: [..., d] tensors reshaped once to [N, d] (N token rows), so that each product is one
# ``mm``. A product of a [..., d] tensor is that same ``mm`` between views (matmul folds the
# leading dimensions), so the values are bit for bit the same; the views and transposes were
# operations a GPU step's host pays: about 2,500 a step on SmolLM2's 210 modules
# (benchmarks/capture_paths.py).

def lora_linear(x: torch.Tensor, w: LoraWeights) -> torch.Tensor:
    """y = x W^T + b + s (x A^T) B^T on rows x [N, d_in], the LoRA path in ``w.lora_dtype`` (None: x's)
    and y in the base's output dtype; the same operations as PEFT's forward (which casts x to
    the adapter's dtype). A 4-bit base's product runs in x's dtype (bitsandbytes' compute dtype
    where the loader sets it to the model's, as ``trainers/base_model.py`` does)."""
    dtype = x.dtype if w.lora_dtype is None else w.lora_dtype
    if w.quant_state is None:
        base = F.linear(x, w.weight, w.bias)
    else:
        bias = None if w.bias is None else w.bias.to(x.dtype)
        base = F.linear(x, dense_weight(w.weight, w.quant_state, x.dtype), bias)
    # Casts only where a dtype differs, checked inline: a ``.to`` that changes nothing is still a
    # call through the dispatcher, which a GPU step's host pays (and a Python helper is a call).
    if x.dtype == w.A.dtype == w.B.dtype == base.dtype == dtype:
        return base + F.linear(F.linear(x, w.A), w.B) * w.scaling
    u = F.linear(x.to(dtype), w.A.to(dtype))
    return (base + F.linear(u, w.B.to(dtype)) * w.scaling).to(base.dtype)


def lora_linear_backward(grad_out: torch.Tensor, x: torch.Tensor, w: LoraWeights, needs: tuple[bool, ...],
                         tap: Tap | None, lead: torch.Size, dx_so_far: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor | None, ...]:
    """(dx, dW, db, dA, dB) of :func:`lora_linear` on rows (grad_out [N, d_out], x [N, d_in]);
    ``needs`` says which (as ``ctx.needs_input_grad``, in that order). u and dL/du [N, r] go to
    ``tap`` when GRIT captures, with ``lead``, the input's leading shape (its product is N).
    ``dx_so_far``: x's gradient from a later consumer, added in the order autograd adds the
    contributions on PEFT's path (that consumer, then the LoRA path, then the base), so that dx
    is bit for bit PEFT's in fp32."""
    dtype = grad_out.dtype if w.lora_dtype is None else w.lora_dtype      # the LoRA path's
    A, B, x_lora, g_lora = w.A, w.B, x, grad_out
    # casts only where a dtype differs (as in lora_linear): eight a module here otherwise
    uniform = A.dtype == B.dtype == x.dtype == grad_out.dtype == w.weight.dtype == dtype
    if not uniform:
        A, B, x_lora, g_lora = A.to(dtype), B.to(dtype), x.to(dtype), grad_out.to(dtype)
    grad_u = (g_lora @ B) * w.scaling                       # dL/du = s dL/dy B
    u = x_lora @ A.t()                                      # recomputed: never saved
    if tap is not None:
        tap(u, grad_u, lead)
    dx = None
    if needs[0]:
        lora_dx = grad_u @ A if uniform else (grad_u @ A).to(grad_out.dtype)
        dx = lora_dx if dx_so_far is None else dx_so_far + lora_dx
        dx = dx + grad_out @ (w.weight if uniform else dense_weight(w.weight, w.quant_state, grad_out.dtype))
    dW = grad_out.t() @ x if needs[1] else None     # a 4-bit weight is frozen: never needed
    db = grad_out.sum(0) if needs[2] and w.bias is not None else None
    dA = grad_u.t() @ x_lora if needs[3] else None
    dB = (g_lora.t() @ u) * w.scaling if needs[4] else None
    if not uniform:
        dA = None if dA is None else dA.to(w.A.dtype)
        dB = None if dB is None else dB.to(w.B.dtype)
    return dx, dW, db, dA, dB


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


class FusedLoraLinear(torch.autograd.Function):
    """One LoRA projection (q, k, v, o, or an MLP projection used alone). Saves x only (q, k and v
    save the same x, so one copy, as Unsloth's ``LoRA_QKV``)."""

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, scaling: float, tap: Tap | None, lora_dtype: torch.dtype | None = None,
                quant_state: object | None = None):
        w = LoraWeights(weight, bias, A, B, scaling, lora_dtype, quant_state)
        # x itself, not its rows: a reshape of a non-contiguous x would be a copy, saved once per
        # projection where q, k and v share x's storage. A 4-bit weight is saved packed, its
        # QuantState (``quant_state``, from the caller's WeightReader) kept on ctx.
        ctx.save_for_backward(x, weight, bias, A, B)
        ctx.scaling, ctx.tap, ctx.lora_dtype, ctx.lead = scaling, tap, lora_dtype, x.shape[:-1]
        ctx.quant_state = quant_state
        y = lora_linear(_rows(x), w)
        return y.view(*ctx.lead, y.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias, A, B = ctx.saved_tensors
        w = LoraWeights(weight, bias, A, B, ctx.scaling, ctx.lora_dtype, ctx.quant_state)
        dx, *grads = lora_linear_backward(_rows(grad_out), _rows(x), w, ctx.needs_input_grad[:5], ctx.tap, ctx.lead)
        return (None if dx is None else dx.view(*ctx.lead, dx.shape[-1]), *grads, None, None, None, None)


class FusedLoraSwiGLU(torch.autograd.Function):
    """A LoRA SwiGLU MLP, down(silu(gate(x)) * up(x)). Saves x, e = gate(x) and g = up(x), as
    Unsloth's ``LoRA_MLP``; h = silu(e) g is recomputed in backward."""

    @staticmethod
    def forward(ctx, x, gW, gb, gA, gB, uW, ub, uA, uB, dW, db, dA, dB, scalings, taps, lora_dtypes=(None,) * 3,
                quant_states=(None,) * 3):
        gate, up, down = (LoraWeights(*t, s, d, q)
                          for t, s, d, q in zip(((gW, gb, gA, gB), (uW, ub, uA, uB), (dW, db, dA, dB)), scalings,
                                                lora_dtypes, quant_states, strict=True))
        rows = _rows(x)
        e, g = lora_linear(rows, gate), lora_linear(rows, up)
        ctx.save_for_backward(x, e, g, gW, gb, gA, gB, uW, ub, uA, uB, dW, db, dA, dB)
        ctx.scalings, ctx.taps, ctx.lora_dtypes, ctx.lead = scalings, taps, lora_dtypes, x.shape[:-1]
        ctx.quant_states = quant_states
        y = lora_linear(F.silu(e) * g, down)
        return y.view(*ctx.lead, y.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x, e, g, *tensors = ctx.saved_tensors
        x = _rows(x)
        gate, up, down = (LoraWeights(*tensors[4 * i:4 * i + 4], s, d, q)
                          for i, (s, d, q) in enumerate(zip(ctx.scalings, ctx.lora_dtypes, ctx.quant_states,
                                                            strict=True)))
        needs, lead = ctx.needs_input_grad, ctx.lead
        act = F.silu(e)
        dh, *d_down = lora_linear_backward(_rows(grad_out), act * g, down, (True, *needs[9:13]), ctx.taps[2], lead)
        # as autograd differentiates act * g, then silu
        de = torch.ops.aten.silu_backward(dh * g, e)
        dg = dh * act
        # up first: autograd reaches the later-created branch first
        dx_up, *d_up = lora_linear_backward(dg, x, up, (needs[0], *needs[5:9]), ctx.taps[1], lead)
        dx, *d_gate = lora_linear_backward(de, x, gate, (needs[0], *needs[1:5]), ctx.taps[0], lead, dx_up)
        return (None if dx is None else dx.view(*lead, dx.shape[-1]), *d_gate, *d_up, *d_down, None, None, None, None)


# ------------------------------------------------------------------------- attaching to a model

TapFactory = Callable[[str], "Tap | None"]   # module key -> the tap for this forward (None: no capture)


def _linear_forward(key: str, read: WeightReader, taps: TapFactory):
    def forward(self, x, *args, **kwargs):
        w = read(self)
        return FusedLoraLinear.apply(x, w.weight, w.bias, w.A, w.B, w.scaling, taps(key), w.lora_dtype, w.quant_state)
    return forward


def _swiglu_forward(keys: tuple[str, str, str], reads: tuple[WeightReader, WeightReader, WeightReader],
                    taps: TapFactory):
    def forward(self, x):
        layers = (self.gate_proj, self.up_proj, self.down_proj)
        ws = [read(layer) for read, layer in zip(reads, layers, strict=True)]
        flat = [t for w in ws for t in (w.weight, w.bias, w.A, w.B)]
        return FusedLoraSwiGLU.apply(x, *flat, tuple(w.scaling for w in ws), tuple(taps(k) for k in keys),
                                     tuple(w.lora_dtype for w in ws), tuple(w.quant_state for w in ws))
    return forward


def capture_kinds(paths: Iterable[str | None]) -> dict[str, int]:
    """How many modules hand GRIT their rows through each kind of path ("fused", "hooks"), from
    per-module paths such as "fused-swiglu" (None: a record from before paths, i.e. hooks)."""
    return dict(sorted(Counter((path or "hooks").split("-")[0] for path in paths).items()))


def is_swiglu_mlp(module: nn.Module) -> bool:
    """A Llama-style MLP: gate/up/down projections and a SiLU activation."""
    act = getattr(module, "act_fn", None)
    # transformers' ACT2FN["silu"] is its own SiLUActivation module (F.silu in its forward)
    silu = isinstance(act, nn.SiLU) or act is F.silu or type(act).__name__ == "SiLUActivation"
    return silu and all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj"))


@dataclass
class FusedAttachment:
    """Which modules run GRIT's fused functions, and how to undo it."""

    fused: dict[str, str]                        # module key -> "linear" or "swiglu"
    unfused: dict[str, str]                      # module key -> why not
    _restore: list[tuple[nn.Module, object]]     # (module, its previous instance ``forward`` or None)

    def detach(self) -> None:
        for module, previous in reversed(self._restore):
            if previous is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = previous
        self._restore.clear()


def _install(module: nn.Module, forward, restore: list) -> None:
    restore.append((module, module.__dict__.get("forward")))
    module.forward = types.MethodType(forward, module)


def attach_fused(model: nn.Module, layers: dict[str, tuple[nn.Module, str]], taps: TapFactory,
                 lora_dtype: str = "adapter") -> FusedAttachment:
    """Give every fusable LoRA layer of ``layers`` (module key -> (PEFT LoRA layer, adapter)) the
    fused function, and every SwiGLU MLP whose three projections are all fusable the fused MLP
    (the attach point Unsloth patches). Layers that cannot be fused are returned with the reason.
    ``lora_dtype``: the LoRA path's dtype, "input" (Unsloth's numerics) or "adapter" (PEFT's)."""
    if lora_dtype not in LORA_DTYPES:
        raise ValueError(f"lora_dtype must be one of {LORA_DTYPES}, not {lora_dtype!r}")
    restore: list = []
    unfused = {key: reason for key, (layer, adapter) in layers.items()
               if (reason := unfusable_reason(layer, adapter)) is not None}
    fused = {key: "linear" for key in layers if key not in unfused}
    by_layer = {id(layer): key for key, (layer, _) in layers.items() if key in fused}
    for key in fused:
        layer, adapter = layers[key]
        _install(layer, _linear_forward(key, WeightReader(layer, adapter, lora_dtype), taps), restore)
    for module in model.modules():
        if not is_swiglu_mlp(module):
            continue
        projections = (module.gate_proj, module.up_proj, module.down_proj)
        keys = tuple(by_layer.get(id(p)) for p in projections)
        if None in keys:
            continue
        reads = tuple(WeightReader(*layers[k], lora_dtype) for k in keys)
        _install(module, _swiglu_forward(keys, reads, taps), restore)
        fused.update({k: "swiglu" for k in keys})
    return FusedAttachment(fused, unfused, restore)


def attach_without_grit(model: nn.Module, lora_dtype: str = "adapter") -> FusedAttachment:
    """The fused functions on every LoRA layer of ``model``, with no tap: plain LoRA through the
    same arithmetic GRIT's fused path runs (Unsloth-style LoRA), the baseline that leaves GRIT's
    own cost alone."""
    return attach_fused(model, {name: (layer, adapter) for name, layer, adapter in lora_layers(model)},
                        lambda _key: None, lora_dtype)
