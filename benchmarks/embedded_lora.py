"""What the model-level benchmarks measure on: the embedded SmolLM2-135M with a LoRA adapter of
the default shape (r=16, alpha 32, every projection), as training attaches it."""

from __future__ import annotations


def embedded_lora_model(b_std: float | None = None):
    """(tokenizer, chat format, PEFT model in eval mode, base model files). ``b_std``: draw B
    from N(0, b_std) so the adapter changes the outputs (seed 0); None keeps PEFT's B = 0."""
    import torch
    from peft import LoraConfig, get_peft_model

    from export.chat_format import chat_format
    from trainers.base_model import load_causal_lm, load_tokenizer, resolve_base_model
    from trainers.config import LoraParams, ModelParams

    params = ModelParams()
    files = resolve_base_model(params)
    tokenizer = load_tokenizer(files, params)
    torch.manual_seed(0)
    model = get_peft_model(load_causal_lm(files, params), LoraConfig(
        r=16, lora_alpha=32, target_modules=LoraParams().target_modules)).eval()
    if b_std is not None:
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(parameter, std=b_std)
    return tokenizer, chat_format(tokenizer), model, files
