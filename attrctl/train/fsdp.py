"""``finetune.sharding: fsdp``: the fine-tune role under PyTorch's FSDP2 (``fully_shard``).

Under ``torchrun``, every decoder layer is sharded across the ranks (its weights, gradients and
AdamW state live 1/N on each rank and are all-gathered for its forward and backward); the token
embedding, the final norm and the LM head stay whole on every rank, because the fused loss reads
``lm_head.weight`` outside any module's forward. Their gradients, where trained, are averaged
across ranks here, as DDP would.

Weights and optimizer state leave the ranks as whole tensors: :func:`full` gathers a sharded
tensor (a collective: every rank calls it, in the same order), so checkpoints and ``model/iter_i``
have the unsharded layout and a sharded run's checkpoint resumes sharded or not.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from attrctl.models.arch import decoder_parts


def shard(model: Any) -> None:
    """``fully_shard`` every decoder layer of ``model`` (the process group is up)."""
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_parts(model).layers:
        fully_shard(layer)


def is_sharded(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded one (a collective), the tensor itself otherwise."""
    return t.full_tensor() if is_sharded(t) else t


def like(whole: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``whole`` laid out as ``param`` is: sharded the same way if ``param`` is sharded."""
    if not is_sharded(param):
        return whole
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(whole.to(param.device), param.device_mesh, param.placements)


def average_replicated_grads(params: Iterable[torch.nn.Parameter], world: int) -> None:
    """All-reduce the gradients FSDP does not reduce (the unsharded trained parameters)."""
    import torch.distributed as tdist

    for p in params:
        if p.grad is not None and not is_sharded(p):
            tdist.all_reduce(p.grad)
            p.grad.div_(world)


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over sharded and whole gradients together: the norm of
    the full gradient (shard norms summed across ranks), the same clip coefficient."""
    import torch.distributed as tdist

    sharded = torch.zeros((), dtype=torch.float64)
    whole = torch.zeros((), dtype=torch.float64)
    for p in params:
        if p.grad is None:
            continue
        if is_sharded(p.grad):
            sharded += p.grad.to_local().double().pow(2).sum().cpu()
        else:
            whole += p.grad.double().pow(2).sum().cpu()
    tdist.all_reduce(sharded)
    total = (sharded + whole).sqrt().float()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for p in params:
        if p.grad is not None:
            p.grad.mul_(coef.to(p.grad.device))
    return total
