"""The fine-tune job: θ_i from θ_{i−1} on the policy's data mixture, regularized by heads R.

One loop, top to bottom. Per step and micro-batch:

    hidden, taps  = LLM(input_ids)                      one forward; taps are detached
    states_k      = head_k.features(taps)               [N, Hk] per attribute (frozen heads)
    loss          = CE(ℓ_t, y_t) + λ_{d(t)} · KL(sg[q_t] ‖ p_t)   fused with the LM head:
                    ℓ = hidden @ W_lmᵀ and r_k = states_k @ W_kᵀ + b_k are formed chunk by chunk
                    and never held as [N, V]
    backward, clip, AdamW step

λ per token comes from the domain of the example the token belongs to (adaptive regularization).
The ``sft`` and ``filter`` baselines (``finetune.objective``) run this same loop with no heads and
λ = 0: the loss is then the plain fused CE; ``classify`` is ``sft`` with the CE taken on the
label words of templated examples alone (:mod:`attrctl.data.template`).
Every ``checkpoint_every`` steps the trainable weights, optimizer, RNG and data position are saved
atomically; a killed run restarts from there and reaches bitwise the same weights, because every
input of a step — weights, optimizer state, the data stream position, the heads — is restored
exactly and CPU kernels are deterministic for a fixed thread count.
"""

from __future__ import annotations

import json
import resource
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from attrctl.data.mixture import IGNORE_INDEX
from attrctl.errors import AttrctlError, Interrupted
from attrctl.faults import fault
from attrctl.heads import forward_with_tap, head_taps
from attrctl.heads_io import load_heads
from attrctl.losses import RegHead, regularized_lm_loss
from attrctl.paths import atomic_dir
from attrctl.train import distributed as dist
from attrctl.train import fsdp
from attrctl.train.context import StopRequest, TrainContext
from attrctl.train.own_samples import OwnBatch, OwnSamples, own_kl_step
from attrctl.train.weights import (
    TRAINABLE,
    load_optimizer,
    load_trainable,
    optimizer_tensors,
    read_safetensors,
    save_trainable,
    select_trainable,
    trainable_state,
)

CHECKPOINT_VERSION = 1  # the layout _checkpoint writes; _restore refuses any other


class _LMForward(torch.nn.Module):
    """The LLM's decoder forward with taps: the module DDP wraps, so gradient averaging hooks see
    every trainable parameter (the LM head is applied inside the fused loss)."""

    def __init__(self, model: Any, taps: list[int], autocast: Callable[[], Any]):
        super().__init__()
        self.model, self.taps, self.autocast = model, taps, autocast

    def forward(self, input_ids: torch.Tensor):
        with self.autocast():  # bf16 autocast under finetune.mixed_precision, else nothing
            return forward_with_tap(self.model, self.taps, input_ids)


def micro_step(
    forward: Callable[[torch.Tensor], tuple[torch.Tensor, dict[int, torch.Tensor]]],
    heads: Sequence[Any],
    ids: torch.Tensor,
    labels: torch.Tensor,
    lam: torch.Tensor,
    lm_weight: torch.Tensor,
    *,
    attr_weights: Sequence[float] | None,
    impl: str,
    chunk_size: int | None,
    grad_accum: int = 1,
):
    """One micro-batch of the fine-tune job: forward with taps, head features, fused loss,
    backward (gradients accumulate; the caller clips and steps).

    Args:
        forward: ``ids → (hidden [b, T, H], {tap: [b, T, H] detached})`` (``forward_with_tap``
            bound to the model and taps, DDP-wrapped or not).
        heads: the frozen regularizer heads (``RegularizerHead``); empty for plain CE.
        ids: [b, T] int64 input ids.
        labels: [N] int64 next-token labels, N = b·(T−1), -100 = ignored.
        lam: [N] fp32 λ_t of each token's domain.
        lm_weight: [V, H] the LM head weight.
        attr_weights: w_k per head (None: all 1).
        impl, chunk_size: the policy's ``loss`` settings.
        grad_accum: micro-batches per step (the loss is divided by it before backward).

    Returns:
        ``(LossOutput, reg_heads)``: the loss (ce/kl per token, detached) and the ``RegHead``
        inputs, for logging.
    """
    hidden, tapped = forward(ids)  # [b, T, H], {tap: [b, T, H]} detached
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # [N, H] predicts labels
    reg_heads = []
    for head in heads:
        with torch.no_grad():
            feats = head.features(tapped[head.tap])[:, :-1]  # [b, T-1, Hk]
        reg_heads.append(RegHead(feats.reshape(-1, feats.shape[-1]), head.weight, head.bias))
    out = regularized_lm_loss(
        h, lm_weight, labels, reg_heads, lam=lam,
        attr_weights=attr_weights if reg_heads else None, impl=impl, chunk_size=chunk_size,
    )  # fmt: skip
    (out.loss / grad_accum).backward()
    return out, reg_heads


def finetune_job(ctx: TrainContext, i: int, heads_index: int | None) -> dict[str, Any]:
    """Fine-tune θ_i from θ_{i−1} with heads R_{heads_index}; ``None``: no heads — under the
    ``sft`` and ``filter`` objectives plain CE (λ is ignored), under ``regularized`` zero heads
    (q = p, the parallel schedule's first iteration). The schedule has checked that θ_{i−1} and
    R_{heads_index} are published (:class:`attrctl.train.plan.FinetuneJob`)."""
    from attrctl.models import load_model

    policy, ft, run = ctx.policy, ctx.policy.finetune, ctx.run
    job = f"finetune/{i}"
    device = ctx.role_device("finetune")
    if ft.batch_size % ctx.world:
        raise AttrctlError(
            f"finetune.batch_size {ft.batch_size} must be a multiple of the number of ranks "
            f"({ctx.world}) so every rank gets the same share of a global batch"
        )

    # --- θ_{i−1}, its trainable subset, the frozen heads and the optimizer
    loaded = load_model(policy.model, device=device, dtype=ctx.compiled.torch_dtype)
    model = select_trainable(loaded.model, ctx.compiled)
    if i > 1:
        load_trainable(model, run.model(i - 1))
    model.train()
    if ft.gradient_checkpointing:  # non-reentrant: frozen layers below feed no grad-requiring input
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    sharded = ft.sharding == "fsdp" and ctx.world > 1
    if sharded:  # every decoder layer 1/N per rank; embeddings, norm and LM head whole
        fsdp.shard(model)
    params = [p for p in model.parameters() if p.requires_grad]
    regularized = ft.objective == "regularized"
    has_heads = regularized and heads_index is not None
    if regularized:
        heads = load_heads(ctx.compiled, model, run.heads(heads_index) if has_heads else None)
    else:  # sft / filter: no heads, so no taps and no KL pass — the plain fused CE
        heads = torch.nn.ModuleList()
    heads.to(device)
    taps = head_taps(heads)
    opt = ctx.compiled.finetune_optimizer(params)
    attr_weights = ctx.compiled.attr_weights
    mixture = ctx.mixture()
    lam_of_domain = torch.tensor(
        [ctx.compiled.lam_for(d) if regularized else 0.0 for d in mixture.domains],
        dtype=torch.float32,
    )  # [D]
    lm_weight = model.get_output_embeddings().weight  # [V, H]; frozen unless method is full

    # --- the KL-only term on the model's own continuations (regularization.own_samples)
    own = None
    if has_heads and policy.regularization.own_samples.lam > 0:
        own = OwnSamples(ctx, i, loaded.tokenizer)
    # λ_own per token over the count the mixture's loss is averaged over (one step, this rank)
    own_scale = policy.regularization.own_samples.lam / (
        (ft.batch_size // ctx.world) * (ft.seq_len - 1) * ft.grad_accum
    )

    # --- resume from this job's checkpoint, if a killed run left one
    step = _restore(ctx, i, model, opt)
    if own is not None and step:
        own.batch = OwnBatch.load(ctx.run.checkpoint(i))
    if ctx.writer:  # steps logged past the checkpoint (or, without one, at all) are redone
        run.drop_metrics_after(job, step)
    first_batch = (i - 1) * ft.steps * ft.grad_accum  # each iteration continues the data stream
    batches = mixture.batches(
        loaded.tokenizer, ft.batch_size, ft.seq_len, start=first_batch + step * ft.grad_accum
    )
    forward = _LMForward(model, taps, lambda: ctx.compiled.autocast(device))
    if not sharded:  # FSDP reduces the layers' gradients itself; DDP otherwise
        forward = dist.wrap(ctx, forward)
    bar = ctx.bar(f"finetune θ_{i}", ft.steps, "step")
    bar.update(step)
    start = time.perf_counter()
    history: list[dict] = []
    StopRequest.begin_job()  # SIGINT/SIGTERM from here: finish the step, checkpoint, stop
    while step < ft.steps:
        if dist.any_rank(ctx, StopRequest.requested):  # asked during the step just done
            _checkpoint(ctx, i, model, opt, step, own, sharded)
            bar.close()
            raise Interrupted(
                f"stopped at step {step}/{ft.steps} of θ_{i}; checkpoint saved in "
                f"{run.checkpoint(i)}. Continue with: attrctl train --resume {run.root}"
            )
        t0 = time.perf_counter()
        if own is not None:  # every refresh_every steps: sample from the weights of this moment
            own.ensure(model, step)
        sums: dict[str, Any] = {"ce": 0.0, "kl": 0.0, "loss": 0.0, "head": [0.0] * len(heads)}
        kl_dom = torch.zeros(len(mixture.domains), dtype=torch.float64)
        tok_dom = torch.zeros(len(mixture.domains), dtype=torch.float64)
        for _ in range(ft.grad_accum):
            batch = next(batches)
            ids = batch["input_ids"][ctx.rank :: ctx.world].to(device)  # [B/W, T] this rank's share
            labels = batch["labels"][ctx.rank :: ctx.world, 1:]  # [B/W, T-1]
            if ft.objective == "classify":  # CE on the label words of templated examples only
                keep = batch["label_mask"][ctx.rank :: ctx.world, 1:]
                labels = labels.masked_fill(~keep, IGNORE_INDEX)
            labels = labels.reshape(-1).to(device)  # [N]
            dom = batch["domain_ids"][ctx.rank :: ctx.world, 1:].reshape(-1)  # [N]
            lam = lam_of_domain[dom].to(device)  # [N] λ_t = λ of the token's domain
            out, reg_heads = micro_step(
                forward, heads, ids, labels, lam, lm_weight, attr_weights=attr_weights,
                impl=policy.loss.impl, chunk_size=policy.loss.chunk_size, grad_accum=ft.grad_accum,
            )  # fmt: skip
            # --- what gets logged (detached, cheap: nothing here touches [N, V])
            valid = labels != -100
            n_valid = max(int(valid.sum()), 1)
            sums["ce"] += float(out.ce.sum()) / n_valid / ft.grad_accum
            sums["kl"] += float(out.kl.sum()) / n_valid / ft.grad_accum
            sums["loss"] += out.loss.item() / ft.grad_accum
            kl_dom.index_add_(0, dom[valid.cpu()], (lam * out.kl)[valid].double().cpu())
            tok_dom.index_add_(0, dom[valid.cpu()], torch.ones(n_valid, dtype=torch.float64))
            y = labels[valid]
            for k, rh in enumerate(reg_heads):
                a = (rh.states[valid] * rh.weight[y]).sum(-1) + rh.bias[y]  # r_t[y_t] [n]
                sums["head"][k] += float(torch.sigmoid(a).mean()) / ft.grad_accum
        kl_own = None
        if own is not None:
            own_ids, own_mask = own.tensors(step, device)
            own_kl = own_kl_step(
                forward, heads, own_ids, own_mask, lm_weight, scale=own_scale,
                attr_weights=attr_weights, impl=policy.loss.impl,
            )  # fmt: skip
            kl_own = dist.all_reduce_mean(ctx, float(own_kl.mean()))
        if sharded:  # the whole parameters' gradients averaged, then one norm over all
            fsdp.average_replicated_grads(params, ctx.world)
            grad_norm = fsdp.clip_grad_norm(params, ft.max_grad_norm)
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, ft.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1

        dt = time.perf_counter() - t0
        record = {
            "kind": "step", "job": job, "iteration": i, "step": step,
            "ce": dist.all_reduce_mean(ctx, sums["ce"]), "kl": dist.all_reduce_mean(ctx, sums["kl"]),
            "loss": dist.all_reduce_mean(ctx, sums["loss"]), "grad_norm": float(grad_norm),
            **({"kl_own": kl_own} if kl_own is not None else {}),
            "lam_kl_by_domain": {d: float(kl_dom[j] / tok_dom[j]) if tok_dom[j] else None
                                 for j, d in enumerate(mixture.domains)},
            "head_value": dict(zip((a.name for a in ctx.compiled.attributes), sums["head"],
                                   strict=False)),  # none without heads (sft, filter)
            "tokens_per_s": ft.batch_size * ft.grad_accum * ft.seq_len / dt,
            "peak_mb": peak_memory_mb(device), "seconds": dt,
        }  # fmt: skip
        ctx.log(record)
        history.append(record)
        bar.update(1, ce=f"{record['ce']:.3f}", kl=f"{record['kl']:.4f}")
        if (step % ft.checkpoint_every == 0 and step < ft.steps
                and not dist.any_rank(ctx, StopRequest.requested)):  # fmt: skip
            _checkpoint(ctx, i, model, opt, step, own, sharded)
        fault(job, step=step)
    # A stop asked for during the last step is not lost: θ_i is complete, so it is saved and
    # published as usual, and the run stops at that job boundary (schedules._run).
    StopRequest.end_job()
    bar.close()

    meta = {"iteration": i, "heads": heads_index if has_heads else 0, "steps": ft.steps}
    state = trainable_state(model) if sharded else None  # gathered on every rank
    if ctx.writer:
        save_trainable(model, run.model(i), meta, state)
    dist.barrier(ctx)
    return {
        "iteration": i, "objective": ft.objective, "heads": meta["heads"], "steps": ft.steps,
        "gradient_checkpointing": _checkpointing(model),
        "ce_first": history[0]["ce"] if history else None,
        "ce_last": _tail_mean(history, "ce"), "kl_last": _tail_mean(history, "kl"),
        "loss_last": _tail_mean(history, "loss"),
        "seconds": round(time.perf_counter() - start, 3),
    }  # fmt: skip


def _checkpointing(model: Any) -> bool:
    """Whether activation checkpointing is on (transformers 5 renamed the flag)."""
    flag = getattr(model, "is_activation_checkpointing", None)
    if flag is None:
        flag = getattr(model, "is_gradient_checkpointing", False)
    return bool(flag)


def _tail_mean(history: list[dict], key: str, n: int = 10) -> float | None:
    vals = [h[key] for h in history[-n:]]
    return sum(vals) / len(vals) if vals else None


def peak_memory_mb(device: str) -> float:
    """Peak memory of this process: CUDA allocator peak on a GPU, resident-set peak on CPU."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ------------------------------------------------------------------------------ checkpoints
def _checkpoint(
    ctx: TrainContext,
    i: int,
    model: Any,
    opt,
    step: int,
    own: OwnSamples | None = None,
    sharded: bool = False,
) -> None:
    """Weights, optimizer, RNG and position of the running fine-tune, and the own-sample batch
    in use, as one folder renamed into place (a kill mid-write leaves the previous checkpoint
    intact)."""
    if not ctx.writer and not sharded:
        return
    from safetensors.torch import save_file

    weights = trainable_state(model)  # under FSDP both gather shards: every rank takes part
    tensors, rest = optimizer_tensors(opt)
    if not ctx.writer:
        return
    with atomic_dir(ctx.run.checkpoint(i)) as tmp:
        save_file(weights, str(tmp / TRAINABLE))
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        save_file(rng_state(), str(tmp / "rng.safetensors"))
        if own is not None and own.batch is not None:
            own.batch.save(tmp)
        state = {"iteration": i, "step": step, "optimizer": rest, "version": CHECKPOINT_VERSION,
                 "data_position": step * ctx.policy.finetune.grad_accum}  # fmt: skip
        (tmp / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")


def _restore(ctx: TrainContext, i: int, model: Any, opt) -> int:
    """Load the fine-tune's checkpoint if there is one; returns the step to continue from."""
    from attrctl.train.rundir import read_json

    folder = ctx.run.checkpoint(i)
    if not (folder / "state.json").exists():
        return 0
    restart = f"delete {folder} to restart this iteration's fine-tune from its start"
    state = read_json(folder / "state.json", "checkpoint state")
    try:
        step, rest = state["step"], state["optimizer"]
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise TypeError(f"step is {step!r}")
        if not isinstance(rest, dict):
            raise TypeError("optimizer is not a mapping")
    except (KeyError, TypeError) as err:
        raise AttrctlError(
            f"{folder / 'state.json'}: checkpoint state is corrupt ({err}); {restart}"
        ) from None
    version = state.get("version", 1)  # checkpoints from before versions were recorded are 1
    if version != CHECKPOINT_VERSION:
        raise AttrctlError(
            f"{folder / 'state.json'}: checkpoint format version {version!r}; this attrctl reads "
            f"version {CHECKPOINT_VERSION} (made by another attrctl version?); {restart}"
        )
    if step >= ctx.policy.finetune.steps:
        raise AttrctlError(
            f"{folder / 'state.json'}: the checkpoint is at step {step}, but this fine-tune has "
            f"{ctx.policy.finetune.steps} steps (another policy's checkpoint?); {restart}"
        )
    load_trainable(model, folder)
    try:
        load_optimizer(opt, read_safetensors(folder / "optimizer.safetensors", "optimizer"), rest)
    except (ValueError, KeyError, RuntimeError) as err:
        raise AttrctlError(
            f"{folder}: optimizer state does not match the model ({err}); {restart}"
        ) from None
    try:
        set_rng_state(read_safetensors(folder / "rng.safetensors", "RNG state"))
    except (RuntimeError, TypeError, ValueError) as err:
        raise AttrctlError(
            f"{folder / 'rng.safetensors'}: not an RNG state of this machine "
            f"({_first_line(err)}); {restart}"
        ) from None
    return step


def rng_state() -> dict[str, torch.Tensor]:
    """Every generator a step may draw from: the CPU one and, where CUDA is initialised, each
    GPU's (dropout and sampling on a GPU draw from those), so a resumed run continues the same
    random streams."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for d, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"cuda:{d}"] = s
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    """Restore :func:`rng_state`'s generators; a checkpoint with CUDA states needs as many GPUs."""
    if "cpu" not in state:
        raise ValueError("no 'cpu' tensor")
    cuda = sorted((k for k in state if k.startswith("cuda:")), key=lambda k: int(k[5:]))
    if cuda:
        if not torch.cuda.is_available() or torch.cuda.device_count() < len(cuda):
            have = torch.cuda.device_count() if torch.cuda.is_available() else 0
            raise ValueError(f"saved with {len(cuda)} CUDA generator(s), this machine has {have}")
        torch.cuda.set_rng_state_all([state[k] for k in cuda])
    torch.set_rng_state(state["cpu"])


def _first_line(err: BaseException) -> str:
    return (str(err) or type(err).__name__).splitlines()[0][:200]
