"""What the Llama-3-8B profile needs, estimated from the model's shapes and the profile's
settings: arithmetic, not a measurement, until a run of the profile replaces it. Rendered into
docs/gpu.md ("What it needs") by ``python -m pipelines.docs``; no torch here.

GB are 10^9 bytes. The assumptions each figure rests on are named beside it in the table.
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1e9
# NF4 (bitsandbytes, double quantisation): 4-bit codes, one absmax per 64 weights stored in 8 bits,
# and one fp32 constant per 256 of those: 4 + 8/64 + 32/(64 x 256) bits a weight.
NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)
# GGUF block formats: Q8_0 holds 32 int8 weights and an fp16 scale, Q4_1 32 4-bit weights, an
# fp16 scale and an fp16 minimum.
Q8_0_BITS = (32 * 8 + 16) / 32
Q4_1_BITS = (32 * 4 + 2 * 16) / 32
# Activations kept for the backward pass, in bf16, per token, block and hidden unit, attention
# scores not kept (fused attention): Korthikanti et al. 2022, "Reducing activation recomputation".
ACTIVATION_BYTES = 34
# PEFT's fp32 copies of each LoRA input (autograd keeps them) can add as much again: the upper end.
PEFT_COPIES = 2
CUDA_CONTEXT_GB = (1.0, 2.0)
ADAM_COPIES = 4          # the fp32 adapter, its gradient and AdamW's two moments


@dataclass(frozen=True)
class LlamaShape:
    """A Llama decoder's shape: ``blocks`` of attention (``heads`` query heads, ``kv_heads``
    key/value heads) and a gated MLP of width ``mlp``; input embeddings and an untied LM head of
    ``vocab`` words."""

    name: str
    blocks: int
    hidden: int
    mlp: int
    heads: int
    kv_heads: int
    vocab: int

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.hidden // self.heads

    def projections(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each of the seven LoRA-able projections of a block."""
        h, kv, m = self.hidden, self.kv_width, self.mlp
        return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, m), "up_proj": (h, m), "down_proj": (m, h)}

    def block_weights(self) -> int:
        return sum(i * o for i, o in self.projections().values())

    def embedding_weights(self) -> int:
        return 2 * self.vocab * self.hidden

    def parameters(self) -> int:
        """Weights of the blocks and embeddings (the norms' few vectors left out)."""
        return self.blocks * self.block_weights() + self.embedding_weights()

    def lora_weights(self, r: int) -> int:
        """LoRA of rank ``r`` on all seven projections of every block: r x (in + out) each."""
        return self.blocks * r * sum(i + o for i, o in self.projections().values())


ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
LLAMA_3_8B = LlamaShape("Llama-3-8B", blocks=32, hidden=4096, mlp=14336, heads=32, kv_heads=8, vocab=128_256)


@dataclass(frozen=True)
class ProfileSettings:
    """What of a profile the estimates read (tests/pipelines/test_gpu_estimates.py ties these to
    the composed ``gpu_llama3_8b`` profile)."""

    r: int
    micro_batch: int
    sequence: int
    variants: int           # each trained, exported (a merged file) and evaluated


GPU_LLAMA3_8B = ProfileSettings(r=16, micro_batch=2, sequence=1024, variants=6)


@dataclass(frozen=True)
class Estimate:
    where: str
    arithmetic: str
    low: float              # GB
    high: float

    def shown(self) -> str:
        return f"{self.low:.1f} GB" if round(self.low, 1) == round(self.high, 1) else \
            f"{self.low:.1f} to {self.high:.1f} GB"


def _b(n: float) -> str:
    return f"{n / 1e9:.2f} B"


def _m(n: float) -> str:
    return f"{n / 1e6:.1f} M"


def memory(shape: LlamaShape, s: ProfileSettings) -> list[Estimate]:
    """GPU memory, host memory and disk per stage of the profile."""
    total, blocks, embeddings = shape.parameters(), shape.blocks * shape.block_weights(), shape.embedding_weights()
    lora, tokens = shape.lora_weights(s.r), s.micro_batch * s.sequence
    nf4 = blocks * NF4_BITS / 8 / GB + embeddings * 2 / GB
    adam = lora * 4 * ADAM_COPIES / GB
    acts = tokens * ACTIVATION_BYTES * shape.hidden * shape.blocks / GB
    logits = tokens * shape.vocab * 4 * 2 / GB
    bf16, fp32 = total * 2 / GB, total * 4 / GB
    merge = fp32 + blocks * 8 / GB
    q8, q4 = total * Q8_0_BITS / 8 / GB, total * Q4_1_BITS / 8 / GB
    adapters = s.variants * lora * 4 / GB
    disk = bf16 + fp32 + q4 + q8 + 2 * s.variants * q8 + fp32
    context = CUDA_CONTEXT_GB
    return [
        Estimate("GPU: NF4 weights", f"{_b(blocks)} block weights x {NF4_BITS:.3f} bits (NF4 codes and double-"
                 f"quantised constants); embeddings and LM head stay bf16: {_b(embeddings)} x 2 bytes", nf4, nf4),
        Estimate("GPU: adapter, its gradient and AdamW's two moments", f"{_m(lora)} x 4 bytes x {ADAM_COPIES}",
                 adam, adam),
        Estimate("GPU: activations of one micro-batch", f"{s.micro_batch} x {s.sequence} tokens x "
                 f"{ACTIVATION_BYTES} bytes x {shape.hidden} a token per block in bf16 (Korthikanti et al. 2022), "
                 f"{shape.blocks} blocks, no gradient checkpointing; PEFT's fp32 copies of the LoRA inputs can "
                 "add as much again", acts, acts * PEFT_COPIES),
        Estimate("GPU: logits and the loss", f"{tokens} tokens x {shape.vocab:,} x 4 bytes, about twice",
                 logits, logits),
        Estimate("GPU: training in all", f"the rows above, plus {context[0]:.0f}-{context[1]:.0f} GB of CUDA context",
                 nf4 + adam + acts + logits + context[0], nf4 + adam + acts * PEFT_COPIES + logits + context[1]),
        Estimate("GPU: export's parity reference", f"{_b(total)} x 2 bytes (bf16, unquantised), after training "
                 "has let go of the GPU; the host holds it while it loads", bf16, bf16),
        Estimate("host: export's merge", f"every base tensor in fp32 ({fp32:.1f} GB) plus each adapted module's "
                 f"update in float64, [out, in] ({_b(blocks)} x 8 bytes)", merge, merge),
        Estimate("GPU: evaluate", f"the bf16 base ({bf16:.1f} GB) with {s.variants} adapters of {_m(lora)} fp32 "
                 "weights", bf16 + adapters, bf16 + adapters),
        Estimate("host: evaluate", f"the base while it loads ({bf16:.1f} GB), then llama.cpp's Q8_0 file "
                 f"({q8:.1f} GB) on the portable build", max(bf16, q8), max(bf16, q8)),
        Estimate("disk", f"the download ({bf16:.1f} GB in bf16), the F32 GGUF ({fp32:.1f} GB), the base in "
                 f"Q4_1 ({Q4_1_BITS:g} bits a weight: {q4:.1f} GB) and in Q8_0 ({Q8_0_BITS:g} bits: {q8:.1f} GB), "
                 f"{s.variants} merged Q8_0 files and their copies in the DVC cache ({2 * s.variants * q8:.1f} GB), "
                 f"a {fp32:.1f} GB scratch file during each merge", disk, disk),
    ]


def shape_note(shape: LlamaShape, s: ProfileSettings) -> str:
    h, kv = shape.hidden, shape.kv_width
    attention = sum(i * o for name, (i, o) in shape.projections().items() if name in ATTENTION)
    mlp = shape.block_weights() - attention
    lora_block = shape.lora_weights(s.r) // shape.blocks
    return (f"{shape.name}: {shape.blocks} blocks, hidden size {h}, MLP {shape.mlp}, {shape.kv_heads} key/value "
            f"heads of {h // shape.heads} (k and v project {h} to {kv}), vocabulary {shape.vocab:,}. Per block "
            f"{_m(attention)} attention and {_m(mlp)} MLP weights, so {shape.blocks} x {_m(shape.block_weights())} "
            f"= {_b(shape.blocks * shape.block_weights())} in the blocks, plus 2 x {shape.vocab:,} x {h} = "
            f"{_b(shape.embedding_weights())} in the embeddings and LM head: {_b(shape.parameters())} parameters. "
            f"LoRA r={s.r} on the seven projections adds {_m(lora_block)} per block, {_m(shape.lora_weights(s.r))} "
            "in all.")


def render(shape: LlamaShape = LLAMA_3_8B, settings: ProfileSettings = GPU_LLAMA3_8B) -> str:
    """The shape note and the memory table of docs/gpu.md."""
    rows = [f"| {e.where} | {e.arithmetic} | {e.shown()} |" for e in memory(shape, settings)]
    return "\n".join([shape_note(shape, settings), "", "| | arithmetic | estimate |", "|---|---|---|", *rows])
