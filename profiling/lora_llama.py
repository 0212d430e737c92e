"""A Llama of random weights with LoRA on its 7 projections: the model the benchmarks and the
tests measure a step on, a real model's layout without its weights."""

from __future__ import annotations

LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def random_lora_llama(layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int, vocab: int,
                      r: int = 16, seed: int = 0):
    """A Llama of random weights with LoRA (r, alpha 2r) on its 7 projections of every block: a
    model's layout (how many LoRA modules, of which shapes) without its weights. SmolLM2-135M's
    layout at tiny width is ``random_lora_llama(30, 64, 128, 4, 2, 96)``: the real 210 modules,
    a step bound by the host like the real model's on a GPU."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=256)
    return get_peft_model(LlamaForCausalLM(config), LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0,
                                                                target_modules=list(LLAMA_PROJECTIONS)))
