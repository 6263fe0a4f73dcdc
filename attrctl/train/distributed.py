"""Running under ``torchrun``: process group, DDP wrapping, and sharded outputs gathered on disk.

``torchrun --nproc-per-node N -m attrctl.cli train --policy P`` starts N ranks; each runs the
schedule. The fine-tune role and head fitting wrap their trainable modules in
:class:`torch.nn.parallel.DistributedDataParallel` (gloo on CPU, nccl on CUDA), which averages
gradients; each rank reads its own share of every global batch. Sampling shards prompts by rank;
each rank writes its rows to a shard file and every rank reads them back after a barrier (no
pickled objects cross processes). Rank 0 alone writes the run directory.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from attrctl.paths import atomic_write


def init_from_env(device: str = "cpu") -> tuple[int, int]:
    """Join the ``torchrun`` group when ``WORLD_SIZE`` > 1; returns (rank, world)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as tdist

    if not tdist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        tdist.init_process_group(backend=backend)
    return tdist.get_rank(), tdist.get_world_size()


def barrier(ctx: Any) -> None:
    if ctx.world > 1:
        import torch.distributed as tdist

        tdist.barrier()


def wrap(ctx: Any, module: torch.nn.Module) -> torch.nn.Module:
    """``module`` in DDP under torchrun, itself otherwise."""
    if ctx.world <= 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module)


def gather_rows(ctx: Any, rows: list[dict]) -> list[dict]:
    """Every rank's rows, on every rank (through shard files in the run directory)."""
    if ctx.world <= 1:
        return rows
    folder = ctx.run.root / ".shards"
    mine = folder / f"rank{ctx.rank}.jsonl"
    with atomic_write(mine) as fh:
        fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    barrier(ctx)
    out = []
    for r in range(ctx.world):
        text = (folder / f"rank{r}.jsonl").read_text(encoding="utf-8")
        out += [json.loads(line) for line in text.splitlines() if line.strip()]
    barrier(ctx)
    if ctx.writer:
        for r in range(ctx.world):
            (folder / f"rank{r}.jsonl").unlink(missing_ok=True)
    return out


def all_reduce_mean(ctx: Any, value: float) -> float:
    """The mean of a scalar over ranks (for logged metrics)."""
    if ctx.world <= 1:
        return value
    import torch.distributed as tdist

    t = torch.tensor([value], dtype=torch.float64)
    tdist.all_reduce(t)
    return float(t.item()) / ctx.world


def any_rank(ctx: Any, flag: bool) -> bool:
    """Whether ``flag`` is set on any rank (a collective: every rank calls it at the same point),
    so that every rank takes the same branch — a stop asked of one rank stops all of them."""
    if ctx.world <= 1:
        return flag
    import torch.distributed as tdist

    t = torch.tensor([int(flag)], dtype=torch.int64)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return bool(t.item())
