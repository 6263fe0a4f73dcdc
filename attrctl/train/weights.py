"""Model and optimizer state on disk: safetensors plus small JSON, written atomically.

θ_i is stored as the weights that train (``trainable.safetensors``): the top layers and norm
under ``top_layers``, the adapters under ``lora``, everything under ``full``. Loading θ_i is the
base model plus those tensors, which reproduces the trained model bit for bit.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from attrctl.errors import AttrctlError
from attrctl.models.arch import check_linear_lm_head, decoder_parts
from attrctl.paths import atomic_dir
from attrctl.policy.compile import CompiledPolicy
from attrctl.train import fsdp
from attrctl.train.context import TrainContext

TRAINABLE = "trainable.safetensors"


# ------------------------------------------------------------------------------ the LLM
def select_trainable(model: Any, compiled: CompiledPolicy) -> Any:
    """Mark the parameters that train under ``finetune.method``; return the model to train
    (a peft model for ``lora``)."""
    ft = compiled.policy.finetune
    check_linear_lm_head(model)  # the fused loss forms the logits as hidden @ W.T
    if ft.method == "lora":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(
            r=ft.lora.r,
            lora_alpha=ft.lora.alpha,
            lora_dropout=ft.lora.dropout,
            target_modules=list(ft.lora.target_modules),
            bias="none",
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(compiled.policy.seed)  # adapter init is part of the seed
            try:
                with warnings.catch_warnings():  # peft calls a transformers API deprecated in 5.x
                    warnings.simplefilter("ignore", FutureWarning)
                    return get_peft_model(model, cfg)
            except ValueError as err:
                raise AttrctlError(f"finetune.lora: {err}") from None
    for p in model.parameters():
        p.requires_grad_(ft.method == "full")
    if ft.method == "top_layers":
        parts = decoder_parts(model)
        n = len(parts.layers)
        if ft.top_layers > n:
            raise AttrctlError(
                f"finetune.top_layers is {ft.top_layers} but the model has {n} layers"
            )
        # The LM head stays frozen: in most small models it is the input embedding (tied), and a
        # frozen head also spares the fused loss its [V, H] weight-gradient GEMM.
        top = [
            *parts.layers[n - ft.top_layers :],
            *([parts.norm] if parts.norm is not None else []),
        ]
        for module in top:
            for p in module.parameters():
                p.requires_grad_(True)
    if model.dtype == torch.float16:  # fp16 AdamW state underflows (its ε 1e-8 is 0 in fp16):
        for p in model.parameters():  # the trained parameters are fp32 master weights
            if p.requires_grad:
                p.data = p.data.float()
        head = model.get_output_embeddings()  # the fp32 top layers meet a frozen fp16 LM head
        if head.weight.dtype == torch.float16:
            head.register_forward_pre_hook(lambda m, args: (args[0].to(m.weight.dtype), *args[1:]))
    return model


def trainable_state(model: Any) -> dict[str, torch.Tensor]:
    """The trained tensors, whole (gathering FSDP shards: a collective under sharding)."""
    return {
        n: fsdp.full(p.detach()).clone().contiguous()
        for n, p in model.named_parameters()
        if p.requires_grad
    }


def save_trainable(
    model: Any, folder: Path, meta: dict[str, Any], state: dict[str, torch.Tensor] | None = None
) -> None:
    """Publish θ: the trainable tensors (``state``, or read from ``model``) and a meta JSON, as
    one folder renamed into place."""
    with atomic_dir(folder) as tmp:
        save_file(_dedup(state or trainable_state(model)), str(tmp / TRAINABLE))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def load_trainable(model: Any, folder: Path) -> None:
    """Copy θ's tensors into ``model`` (already prepared with :func:`select_trainable`)."""
    tensors = read_safetensors(folder / TRAINABLE, "model weights")
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in tensors]
    unknown = [n for n in tensors if n not in params]
    if missing or unknown:
        raise AttrctlError(
            f"{folder / TRAINABLE}: does not match this policy's model "
            f"({len(missing)} trainable tensors missing, {len(unknown)} unknown, e.g. "
            f"{(missing + unknown)[0]!r})"
        )
    with torch.no_grad():
        for name, t in tensors.items():
            if params[name].shape != t.shape:
                raise AttrctlError(
                    f"{folder / TRAINABLE}: {name} has shape {tuple(t.shape)}, the model "
                    f"{tuple(params[name].shape)}"
                )
            params[name].copy_(fsdp.like(t, params[name]))


def read_safetensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise AttrctlError(f"{path}: {what} missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise AttrctlError(f"{path}: {what} unreadable or corrupt ({err})") from None


def _dedup(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage; clone() above gives each tensor its own
    return {k: v.contiguous() for k, v in tensors.items()}


# ------------------------------------------------------------------------------ θ_i
def load_theta(ctx: TrainContext, i: int, role: str):
    """θ_i on the role's device: the base model with iteration i's trainable tensors, in eval
    mode, plus its tokenizer. θ_0 is the base model."""
    from attrctl.models import load_model

    loaded = load_model(
        ctx.policy.model, device=ctx.role_device(role), dtype=ctx.compiled.torch_dtype
    )
    model = select_trainable(loaded.model, ctx.compiled)
    if i > 0:
        if ctx.run.done(f"finetune/{i}") is None:
            raise AttrctlError(
                f"{ctx.run.root}: θ_{i} (finetune/{i}) is not published in state.json"
            )
        load_trainable(model, ctx.run.model(i))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, loaded.tokenizer


# ------------------------------------------------------------------------------ optimizer
def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """AdamW state as flat tensors (safetensors) plus the JSON-able rest."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():  # whole tensors: FSDP shards gathered (a collective)
            v = fsdp.full(v.detach())
            tensors[f"{idx}.{k}"] = v.clone().contiguous().reshape(v.shape)
    return tensors, {"param_groups": sd["param_groups"]}


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], rest: dict):
    """Restore AdamW state saved by :func:`optimizer_tensors`.

    Raises:
        ValueError: the state does not fit ``opt``'s parameters (other tensor names, counts or
            shapes, malformed param groups); nothing is changed then.
    """
    params = [p for group in opt.param_groups for p in group["params"]]
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        idx, sep, k = key.partition(".")
        if not sep or not idx.isdigit() or int(idx) >= len(params):
            raise ValueError(f"optimizer tensor {key!r} names no parameter")
        if k in ("exp_avg", "exp_avg_sq") and v.shape != params[int(idx)].shape:
            raise ValueError(
                f"optimizer tensor {key!r} has shape {tuple(v.shape)}, the parameter "
                f"{tuple(params[int(idx)].shape)}"
            )
        if k in ("exp_avg", "exp_avg_sq"):  # sharded as the parameter is, under FSDP
            v = fsdp.like(v, params[int(idx)])
        state.setdefault(int(idx), {})[k] = v
    groups = rest.get("param_groups") if isinstance(rest, dict) else None
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise ValueError("param_groups is not a list of groups")
    try:
        opt.load_state_dict({"state": state, "param_groups": groups})
    except (KeyError, TypeError) as err:
        raise ValueError(f"malformed param groups ({err!r})") from None
