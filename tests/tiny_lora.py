"""Test helpers: a tiny random Llama with LoRA on all projections, and deterministic batches."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 96
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_base_model(seed: int = 0) -> LlamaForCausalLM:
    """The random Llama under :func:`tiny_lora_model` (same seed, same weights)."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config)


def tiny_lora_model(seed: int = 0, r: int = 4, random_B: bool = False, rslora: bool = False):
    model = tiny_base_model(seed)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=TARGETS,
                                                   use_rslora=rslora))
    if random_B:
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(parameter, std=0.05)
    return peft_model


def lora_grads(model) -> dict[str, torch.Tensor]:
    """A copy of every LoRA parameter's gradient (the ones a step has filled)."""
    return {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n and p.grad is not None}


def batches(n: int, seed: int = 1, batch_size: int = 4, length: int = 12):
    """Batches with right padding (attention 0, label -100) on part of every row."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (batch_size, length), generator=generator)
        lengths = torch.randint(length // 2, length + 1, (batch_size,), generator=generator)
        attention = (torch.arange(length)[None, :] < lengths[:, None]).long()
        labels = ids.masked_fill(attention == 0, -100)
        out.append({"input_ids": ids, "attention_mask": attention, "labels": labels})
    return out



def ddp_worker(rank: int, world_size: int, folder: str) -> None:
    """Train 3 GRIT steps under DDP on rank-specific data, with and without the factor
    all-reduce, and save each rank's factors and adapter, and what attaching GRIT with
    truncation said (used by the distributed test)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from trainers.grit import GritError, GritManager, GritParams

    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world_size)
    results = {}
    try:
        GritManager(tiny_lora_model(seed=0), GritParams(reprojection=True, truncate=True))
        results["truncate"] = "attached"
    except GritError as error:
        results["truncate"] = str(error)
    for allreduce in (True, False):
        model = tiny_lora_model(seed=0)
        ddp = DistributedDataParallel(model)
        manager = GritManager(model, GritParams(min_samples=8, update_freq=1, allreduce=allreduce))
        optimizer = manager.wrap_optimizer(
            torch.optim.AdamW([p for n, p in model.named_parameters() if "lora_" in n], lr=1e-2), max_grad_norm=1.0)
        for batch in batches(3, seed=100 + rank):
            ddp(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        results[allreduce] = {
            "factors": {name: manager.covariances(name)[:2] for name in manager.modules},
            "lora": {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n},
        }
    torch.save(results, f"{folder}/rank{rank}.pt")
    dist.destroy_process_group()


class Rows(torch.utils.data.Dataset):
    """The rows of ``batches(4, batch_size=4)``, one example each, for a Trainer."""

    def __init__(self):
        self.rows = [{k: v[i] for k, v in b.items()} for b in batches(4, batch_size=4) for i in range(4)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return self.rows[index]
