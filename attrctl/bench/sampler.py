"""How close the sampler runs to its matmul floor (``attrctl bench sampler``).

One :func:`attrctl.sampling.sample_continuations` call (the synthesizer's and the iteration's
sampler: a batch of prompts, KV cache, top-p) runs under ``torch.profiler``; its CPU time is split
into the model's matrix products (``aten::mm``/``addmm``/``bmm``/``matmul``/``linear`` and the
attention kernel), the top-p/sampling ops (softmax, top-k, sort, cumsum, searchsorted) and the
rest (norms, activations, rotary embeddings, cache and tensor bookkeeping, Python). The **floor**
is the time the same matrix products take alone: the model's weight matrices multiplied by
activations of the step's shape, once per token step, measured in the same process. The ratio
floor / step says what share of the achievable speed the sampler reaches.
"""

from __future__ import annotations

import time
from typing import Any

import torch

MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear",
              "aten::_scaled_dot_product_flash_attention_for_cpu",
              "aten::scaled_dot_product_attention")  # fmt: skip
SAMPLING_OPS = ("aten::softmax", "aten::_softmax", "aten::topk", "aten::sort", "aten::cumsum",
                "aten::searchsorted", "aten::masked_fill", "aten::scatter_")  # fmt: skip


def _linear_shapes(model: Any) -> list[tuple[int, int]]:
    """``(in, out)`` of every linear map a token passes through, the LM head included."""
    shapes = [tuple(m.weight.shape[::-1]) for m in model.modules()
              if isinstance(m, torch.nn.Linear)]  # fmt: skip
    return shapes


def matmul_floor(model: Any, batch: int, steps: int, repeats: int = 3) -> float:
    """Seconds the decode steps' weight matmuls take alone (``steps`` steps of ``batch`` rows),
    the best of ``repeats``; attention over the cache is left out (the floor is a lower bound)."""
    shapes = _linear_shapes(model)
    xs = {i: torch.randn(batch, i) for i, _ in shapes}
    ws = [torch.randn(i, o) for i, o in shapes]
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            for (i, _), w in zip(shapes, ws, strict=True):
                xs[i] @ w
        best = min(best, time.perf_counter() - t0)
    return best


def profile_sampler(model: Any, tokenizer: Any, prompts: list[str], *, max_new_tokens: int,
                    top_p: float = 0.9) -> dict[str, Any]:  # fmt: skip
    """Sample once (warm-up), then profile one timed call; the time split and the floor."""
    from torch.profiler import ProfilerActivity, profile

    from attrctl.sampling import sample_continuations

    seeds = list(range(len(prompts)))
    sample_continuations(model, tokenizer, prompts[:4], seeds[:4], max_new_tokens=4, top_p=top_p)
    t0 = time.perf_counter()
    out = sample_continuations(model, tokenizer, prompts, seeds, max_new_tokens=max_new_tokens,
                               top_p=top_p)  # fmt: skip
    wall = time.perf_counter() - t0
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        sample_continuations(model, tokenizer, prompts, seeds, max_new_tokens=max_new_tokens,
                             top_p=top_p)  # fmt: skip
    profiled = time.perf_counter() - t0
    groups = {"matmul": 0.0, "sampling": 0.0}
    total = 0.0
    for e in prof.key_averages():
        if e.key.startswith("aten::") or e.key.startswith("mkl"):
            t = e.self_cpu_time_total / 1e6
            total += t
            if e.key in MATMUL_OPS:
                groups["matmul"] += t
            elif e.key in SAMPLING_OPS:
                groups["sampling"] += t
    tokens = sum(len(t) for t in out)
    steps = max(len(t) for t in out)
    floor = matmul_floor(model, len(prompts), steps)
    return {
        "rows": len(prompts), "max_new_tokens": max_new_tokens, "tokens": tokens,
        "seconds": wall, "tokens_per_s": tokens / wall,
        "op_seconds": total, "matmul_seconds": groups["matmul"],
        "sampling_seconds": groups["sampling"],
        "other_seconds": total - groups["matmul"] - groups["sampling"],
        "profiled_seconds": profiled, "python_seconds": max(profiled - total, 0.0),
        "floor_seconds": floor, "floor_share": floor / wall,
        "flop_per_token": 2 * sum(i * o for i, o in _linear_shapes(model)),
        "threads": torch.get_num_threads(),
    }  # fmt: skip


def describe(r: dict[str, Any]) -> str:
    def pct(x: float) -> str:  # shares of the profiled call (the profiler adds overhead)
        return f"{x:6.2f} s  {100 * x / r['profiled_seconds']:5.1f}%"

    return "\n".join([
        f"sampler: {r['rows']} rows × {r['max_new_tokens']} tokens, top-p 0.9, "
        f"{r['threads']} threads: {r['tokens']} tokens in {r['seconds']:.2f} s "
        f"= {r['tokens_per_s']:.0f} tokens/s",
        f"  matrix products (model + attention)  {pct(r['matmul_seconds'])}",
        f"  top-p and sampling ops               {pct(r['sampling_seconds'])}",
        f"  other ops (norms, rotary, cache …)   {pct(r['other_seconds'])}",
        f"  outside ops (Python, dispatch)       {pct(r['python_seconds'])}",
        f"matmul floor: the same weight matmuls alone take {r['floor_seconds']:.2f} s "
        f"({r['flop_per_token'] / 1e6:.1f} MFLOP per token): the sampler runs at "
        f"{100 * r['floor_share']:.0f}% of the floor's speed",
    ])  # fmt: skip
