"""What a fine-tune needs in GPU memory, per component, before anyone buys the GPUs
(``attrctl memory``).

For a model shape (a transformers config: a local folder, a built-in spec, or one of the known
shapes below) and a policy's fine-tune settings, the peak memory of one rank of the fine-tune job,
split into the parts a user can act on::

    weights         P · b                 (b = bytes of the policy's dtype; sharded: ÷ N)
    gradients       T · g                 (T trained parameters, g their dtype's bytes; ÷ N)
    AdamW state     T · 2 · g             (two moments in the trained parameters' dtype; ÷ N)
    activations     what backward keeps, for the trained layers, at batch × seq (this rank's
                    share of the batch): per token and layer 6H + 4I + 2·kv values of the
                    model's dtype (norm inputs, q/k/v, attention output, o_proj input, the
                    MLP's gate, up, activation and down input; flash attention keeps no
                    [seq, seq] scores); with gradient checkpointing only each layer's input
                    (H values) and one layer's full set
    heads           the frozen regularizer heads (fp32) and their features at batch × seq
    fused loss      the chunked loss' buffers: three fp32 [C, V] (C from the chunk rule of
                    ``attrctl.losses.chunked.pick_chunk_size``) and the fp32 [N, H] hidden grad
    FSDP buffer     (sharded only) one decoder layer's unsharded weights and gradients

Layer sizes assume a Llama-style layer (q/k/v/o projections, a gated MLP); for other families
the estimate is approximate. The numbers are estimates of tensors, not allocator measurements: CUDA context (~0.5 GB),
allocator fragmentation and temporary workspaces come on top (budget ~10%).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from attrctl.errors import AttrctlError

GIB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Shape:
    """The sizes of a decoder-only transformer that memory depends on."""

    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool

    @property
    def kv(self) -> int:  # width of k (or v): kv heads × head dim
        return self.kv_heads * (self.hidden // self.heads)

    @property
    def layer_params(self) -> int:
        h, i = self.hidden, self.intermediate
        return 2 * h * h + 2 * h * self.kv + 3 * h * i + 2 * h  # q, o, k, v, MLP, 2 norms

    @property
    def params(self) -> int:
        embed = self.vocab * self.hidden
        return self.layers * self.layer_params + embed * (1 if self.tied else 2) + self.hidden


#: shapes from the models' published configs, so planning needs no download
KNOWN: dict[str, Shape] = {
    "llama2-7b": Shape("Llama-2-7B", 32, 4096, 11008, 32, 32, 32000, False),
    "llama3-8b": Shape("Llama-3-8B", 32, 4096, 14336, 32, 8, 128256, False),
    "smollm2-135m": Shape("SmolLM2-135M", 30, 576, 1536, 9, 3, 49152, True),
}


def shape_of(spec: str) -> Shape:
    """A known shape name, or a model spec whose config is read (``bundled:``, ``tiny-random``,
    a local folder); hub ids need the hub."""
    if spec in KNOWN:
        return KNOWN[spec]
    if spec == "bundled:smollm2-135m-instruct":
        return KNOWN["smollm2-135m"]
    if spec == "tiny-random":
        from attrctl.models.load import tiny_random_config

        cfg = tiny_random_config(559)
    else:
        from transformers import AutoConfig

        try:
            cfg = AutoConfig.from_pretrained(spec)
        except Exception as err:  # many error classes, all user-facing
            known = ", ".join(KNOWN)
            raise AttrctlError(
                f"model {spec!r}: cannot read its config ({type(err).__name__}); give a local "
                f"model folder or one of the known shapes: {known}"
            ) from None
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    heads = int(text.num_attention_heads)
    return Shape(
        name=spec, layers=int(text.num_hidden_layers), hidden=int(text.hidden_size),
        intermediate=int(getattr(text, "intermediate_size", None) or 4 * text.hidden_size),
        heads=heads, kv_heads=int(getattr(text, "num_key_value_heads", None) or heads),
        vocab=int(text.vocab_size), tied=bool(getattr(text, "tie_word_embeddings", False)),
    )  # fmt: skip


@dataclass(frozen=True)
class Plan:
    """One configuration's estimate, in bytes per rank."""

    label: str
    gpus: int
    trained_params: int
    weights: float
    gradients: float
    adamw: float
    activations: float
    heads: float
    fused_loss: float
    fsdp_buffer: float

    @property
    def total(self) -> float:
        return (self.weights + self.gradients + self.adamw + self.activations + self.heads
                + self.fused_loss + self.fsdp_buffer)  # fmt: skip

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total": self.total}


def trained_params(shape: Shape, method: str, top_layers: int, lora_r: int,
                   lora_targets: list[str]) -> int:  # fmt: skip
    """Parameters the fine-tune trains under ``method``."""
    if method == "full":
        return shape.params
    if method == "top_layers":
        return top_layers * shape.layer_params + shape.hidden  # + the final norm
    h, i, kv = shape.hidden, shape.intermediate, shape.kv
    sizes = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
             "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}  # fmt: skip
    unknown = [t for t in lora_targets if t not in sizes]
    if unknown:
        raise AttrctlError(f"memory plan: unknown LoRA target module {unknown[0]!r}")
    return shape.layers * sum(lora_r * (a + b) for a, b in (sizes[t] for t in lora_targets))


def plan(shape: Shape, *, label: str, method: str, gpus: int, sharding: str, dtype: str,
         batch: int, seq: int, top_layers: int = 4, lora_r: int = 8,
         lora_targets: tuple[str, ...] = ("q_proj", "v_proj"), head_rank: int = 64,
         attributes: int = 1, gradient_checkpointing: bool = False) -> Plan:  # fmt: skip
    """The per-rank estimate of one fine-tune configuration (see the module docstring)."""
    from attrctl.losses.chunked import pick_chunk_size

    if gpus < 1:
        raise AttrctlError(f"memory plan: gpus must be ≥ 1, got {gpus}")
    b = DTYPE_BYTES[dtype]
    g = 4 if dtype == "float16" else b  # fp16 keeps fp32 master weights for what it trains
    t = trained_params(shape, method, top_layers, lora_r, list(lora_targets))
    shard = gpus if sharding == "fsdp" else 1
    tokens = max(batch // gpus, 1) * seq  # this rank's tokens per micro-batch
    h, i, kv = shape.hidden, shape.intermediate, shape.kv
    per_token_layer = 6 * h + 4 * i + 2 * kv
    # backward runs through the trained layers only (top_layers), all layers otherwise
    deep = top_layers if method == "top_layers" else shape.layers
    if gradient_checkpointing:
        acts = tokens * (deep * h + per_token_layer) * b
    else:
        acts = tokens * deep * per_token_layer * b
    acts += tokens * h * 4 * 2  # final hidden state and its fp32 gradient into the loss
    heads = attributes * (shape.vocab * (head_rank + 1) + h * head_rank) * 4
    heads += attributes * tokens * head_rank * 4  # head features at batch × seq
    c = pick_chunk_size(tokens, shape.vocab, h=h)
    loss = 3 * c * shape.vocab * 4 + tokens * h * 4
    weights = shape.params * b
    if method == "lora":
        weights += t * 4  # adapters in fp32
    buffer = 2 * shape.layer_params * b if sharding == "fsdp" and gpus > 1 else 0
    return Plan(label, gpus, t, weights / shard, t * g / shard, 2 * t * g / shard, acts, heads,
                loss, buffer)  # fmt: skip


def plans_for(shape: Shape, *, gpus: int, dtype: str, batch: int, seq: int, top_layers: int,
              lora_r: int, lora_targets: tuple[str, ...], gradient_checkpointing: bool,
              head_rank: int = 64, attributes: int = 1) -> list[Plan]:  # fmt: skip
    """Full, top_layers and LoRA on one GPU, and full / FSDP on ``gpus`` GPUs."""
    common = {"dtype": dtype, "batch": batch, "seq": seq, "top_layers": top_layers,
              "lora_r": lora_r, "lora_targets": lora_targets, "head_rank": head_rank,
              "attributes": attributes, "gradient_checkpointing": gradient_checkpointing}  # fmt: skip
    rows = [
        plan(shape, label="full, 1 GPU", method="full", gpus=1, sharding="none", **common),
        plan(
            shape,
            label=f"top {top_layers} layers, 1 GPU",
            method="top_layers",
            gpus=1,
            sharding="none",
            **common,
        ),
        plan(
            shape, label=f"LoRA r {lora_r}, 1 GPU", method="lora", gpus=1, sharding="none", **common
        ),
    ]
    if gpus > 1:
        rows += [
            plan(
                shape,
                label=f"full, DDP × {gpus}",
                method="full",
                gpus=gpus,
                sharding="none",
                **common,
            ),
            plan(
                shape,
                label=f"full, FSDP × {gpus}",
                method="full",
                gpus=gpus,
                sharding="fsdp",
                **common,
            ),
        ]
    return rows


def format_plans(shape: Shape, rows: list[Plan], *, dtype: str, batch: int, seq: int) -> str:
    """A Markdown table, GiB per rank."""
    head = (f"{shape.name}: {shape.params / 1e9:.2f} B parameters, {dtype} weights, batch "
            f"{batch} × seq {seq} (per step, split across ranks)")  # fmt: skip
    cols = ("weights", "gradients", "adamw", "activations", "heads", "fused_loss", "fsdp_buffer")
    lines = [head, "",
             "| configuration | trained params | " + " | ".join(cols) + " | total / GPU |",
             "|---|---|" + "---|" * (len(cols) + 1)]  # fmt: skip
    for r in rows:
        cells = [f"{getattr(r, c) / GIB:.2f}" for c in cols]
        lines.append(f"| {r.label} | {r.trained_params / 1e6:,.1f} M | " + " | ".join(cells)
                     + f" | **{r.total / GIB:.1f} GiB** |")  # fmt: skip
    lines += ["", "GiB per rank; CUDA context (~0.5 GB), fragmentation and workspaces come on "
              "top (budget ~10%)."]  # fmt: skip
    return "\n".join(lines)
