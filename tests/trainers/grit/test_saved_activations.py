"""The hybrid keeps Unsloth's memory savings: the activations a hybrid GRIT forward saves for
backward, measured on the ``meta`` device at the real SmolLM2-135M and Llama-3-8B shapes (bf16,
fp32 adapters, 4 x 2048 tokens), against Unsloth-style LoRA. Unsloth-style LoRA is GRIT's fused
functions without GRIT; that they save exactly what Unsloth's own ``LoRA_W``, ``LoRA_QKV`` and
``LoRA_MLP`` save is checked against Unsloth itself (in a subprocess: importing Unsloth patches
transformers for the whole process)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from profiling.lora_llama import LLAMA_PROJECTIONS
from profiling.memory import saved_activation_bytes
from trainers.grit import GritManager, GritParams
from trainers.grit.fused import attach_without_grit

# (layers, hidden, intermediate, heads, kv heads, vocabulary)
SHAPES = {"SmolLM2-135M": (30, 576, 1536, 9, 3, 49152), "Llama-3-8B": (32, 4096, 14336, 32, 8, 128256)}
TOKENS = (4, 2048)


def meta_lora_llama(layers, hidden, intermediate, heads, kv_heads, vocab):
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads)
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
        # PEFT's default keeps the adapters fp32 in a bf16 model (autocast_adapter_dtype)
        return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=list(LLAMA_PROJECTIONS)))


def forward_saves(model) -> int:
    ids = torch.zeros(*TOKENS, dtype=torch.long, device="meta")
    return saved_activation_bytes(lambda: model(input_ids=ids).logits)


@pytest.mark.parametrize("shape", SHAPES)
def test_a_hybrid_grit_step_saves_what_unsloth_style_lora_saves(shape):
    model = meta_lora_llama(*SHAPES[shape])
    lora = attach_without_grit(model)
    assert not lora.unfused
    unsloth_style = forward_saves(model)
    lora.detach()
    hybrid = GritManager(model, GritParams(capture="fused", fused_lora_dtype="input"))     # Unsloth's numerics
    assert all(path.startswith("fused") for path in hybrid.capture_paths.values())
    grit_fused = forward_saves(model)
    hybrid.detach()
    # PEFT's numerics (the LoRA path in the fp32 adapters' dtype) save no fp32 copy either: the
    # cast of the input is redone in backward
    peft_numerics = GritManager(model, GritParams(capture="fused", fused_lora_dtype="adapter"))
    assert forward_saves(model) == grit_fused
    peft_numerics.detach()
    # the hybrid before GRIT's fused functions: PEFT's forward put back, and hooks
    hooks = GritManager(model, GritParams(capture="hooks"))
    grit_hooks = forward_saves(model)
    hooks.detach()
    assert grit_fused / unsloth_style <= 1.01, (grit_fused, unsloth_style)
    assert grit_hooks / unsloth_style > 1.15, "the gate tells the hooked PEFT path apart"


UNSLOTH_BLOCKS = textwrap.dedent("""
    import json, sys
    import torch, torch.nn.functional as F
    import unsloth  # noqa: F401
    from unsloth.kernels.fast_lora import LoRA_MLP, LoRA_QKV, LoRA_W
    from profiling.memory import saved_activation_bytes
    from trainers.grit.fused import FusedLoraLinear, FusedLoraSwiGLU

    hidden, intermediate, r, tokens = json.loads(sys.argv[1])
    def p(*shape, dtype=torch.bfloat16):
        return torch.nn.Parameter(torch.empty(*shape, dtype=dtype, device="meta"))
    x = torch.empty(*tokens, hidden, dtype=torch.bfloat16, device="meta", requires_grad=True)
    W, A, B = p(hidden, hidden), p(r, hidden, dtype=torch.float32), p(hidden, r, dtype=torch.float32)
    G, GA, GB = p(intermediate, hidden), p(r, hidden, dtype=torch.float32), p(intermediate, r, dtype=torch.float32)
    D, DA, DB = p(hidden, intermediate), p(r, intermediate, dtype=torch.float32), p(hidden, r, dtype=torch.float32)
    one = (W, None, A, B, 2.0)
    swiglu = lambda e, g: F.silu(e) * g      # Unsloth's Triton kernel does not run on meta
    sizes = {
        "o": [saved_activation_bytes(lambda: LoRA_W.apply(x, *one)),
              saved_activation_bytes(lambda: FusedLoraLinear.apply(x, W, None, A, B, 2.0, None))],
        "qkv": [saved_activation_bytes(lambda: LoRA_QKV.apply(x, *one, *one, *one)),
                saved_activation_bytes(lambda: [FusedLoraLinear.apply(x, W, None, A, B, 2.0, None) for _ in "qkv"])],
        "mlp": [saved_activation_bytes(lambda: LoRA_MLP.apply(x, G, None, GA, GB, 2.0, G, None, GA, GB, 2.0,
                                                              D, None, DA, DB, 2.0, swiglu, None)),
                saved_activation_bytes(lambda: FusedLoraSwiGLU.apply(x, G, None, GA, GB, G, None, GA, GB,
                                                                     D, None, DA, DB, (2.0,) * 3, (None,) * 3))],
    }
    print("SIZES " + json.dumps(sizes))
""")


@pytest.mark.parametrize("shape", SHAPES)
def test_the_fused_functions_save_what_unsloths_own_save(shape):
    _, hidden, intermediate, *_ = SHAPES[shape]
    done = subprocess.run([sys.executable, "-c", UNSLOTH_BLOCKS, json.dumps([hidden, intermediate, 16, TOKENS])],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    sizes = json.loads(done.stdout.split("SIZES ", 1)[1])
    for block, (unsloth, ours) in sizes.items():
        assert unsloth > 0 and ours == unsloth, (block, unsloth, ours)
