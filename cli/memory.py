"""``attrctl memory``: what a policy's fine-tune needs in GPU memory, per component."""

from __future__ import annotations

import json

import typer

HELP = """Estimate a fine-tune's GPU memory per rank, per component.

For the policy's fine-tune settings (dtype, batch × seq, top_layers, LoRA rank and targets, heads, gradient checkpointing) on MODEL's shape: weights, gradients, AdamW state, activations, heads, the fused loss' chunk buffers and the FSDP gather buffer, for full, top-layers and LoRA fine-tuning on one GPU and full fine-tuning under DDP and FSDP on --gpus GPUs. Estimates of tensors, not allocator measurements (budget ~10% more).

\b
Examples:
    attrctl memory --policy toxicity --model llama2-7b --gpus 8
    attrctl memory --policy toxicity --model llama2-7b --gpus 4 --set dtype=bfloat16
    attrctl memory --policy toxicity                  # the policy's own model
"""


def memory(
    policy: str = typer.Option("toxicity", "--policy", "-p", help="Policy name or YAML path."),
    model: str | None = typer.Option(
        None,
        help="Shape to plan for: llama2-7b, llama3-8b, smollm2-135m, or a model spec "
        "(default: the policy's model).",
    ),
    gpus: int = typer.Option(1, min=1, help="GPUs for the DDP / FSDP rows."),
    overrides: list[str] = typer.Option([], "--set", help="Policy override KEY=VALUE."),
    as_json: bool = typer.Option(False, "--json", help="Print the rows as JSON."),
) -> None:
    from attrctl.memory import format_plans, plans_for, shape_of
    from attrctl.policy import load_policy

    pol = load_policy(policy, overrides)
    ft = pol.finetune
    shape = shape_of(model or pol.model)
    heads = pol.attributes[0].head
    rows = plans_for(
        shape, gpus=gpus, dtype=pol.dtype, batch=ft.batch_size, seq=ft.seq_len,
        top_layers=ft.top_layers, lora_r=ft.lora.r, lora_targets=tuple(ft.lora.target_modules),
        gradient_checkpointing=ft.gradient_checkpointing, head_rank=heads.rank or shape.hidden,
        attributes=len(pol.attributes),
    )  # fmt: skip
    if as_json:
        typer.echo(json.dumps([r.as_dict() for r in rows], indent=1))
    else:
        typer.echo(format_plans(shape, rows, dtype=pol.dtype, batch=ft.batch_size, seq=ft.seq_len))


memory.__doc__ = HELP


def register(app: typer.Typer) -> None:
    app.command("memory", help=HELP)(memory)
