"""Launch-time helpers shared by the kernels: can Triton run here, block sizes, chunk sizes.

This module never imports Triton at import time, so the loss dispatcher can ask
:func:`triton_support` *before* deciding to load the kernels. Whether a ``@triton.jit``
function is compiled for the GPU or run by the CPU interpreter is decided when the kernel
module is first imported (Triton reads ``TRITON_INTERPRET`` at decoration time), so the
environment variable must be set before the first call into ``attrctl.kernels``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass

import torch

# Largest vocabulary tile one program holds in registers. 4096 fp32 lanes × the handful of live
# vectors of the two-LSE pass fit 8 warps without spilling; larger tiles do not add bandwidth.
MAX_BLOCK_V = 4096
# Under the interpreter every tile is a numpy array and every loop iteration costs Python
# overhead, but the tests want the V loop and its ragged tail exercised, so tiles stay small.
INTERPRET_BLOCK_V = 128


@dataclass(frozen=True)
class KernelConfig:
    """Launch parameters; ``None`` picks them from the shapes (see :func:`pick_block_v`).

    Attributes:
        block_v: vocabulary tile (a power of two).
        num_warps: warps per program (one program handles one row).
    """

    block_v: int | None = None
    num_warps: int | None = None


def interpreter_enabled() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for the CPU interpreter (Triton's own truthy values)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def triton_support(device: torch.device | str) -> tuple[bool, str]:
    """Whether the Triton kernels can run on tensors of ``device``; if not, a reason to show.

    Args:
        device: where the loss inputs live.

    Returns:
        ``(True, "")`` or ``(False, reason)``; the reason is one sentence naming the fix.
    """
    device = torch.device(device)
    if importlib.util.find_spec("triton") is None:
        return False, "Triton is not installed (pip install triton; Linux only)"
    if device.type == "cuda":
        return True, ""
    if device.type == "cpu":
        if interpreter_enabled() and _loaded_compiled():
            return False, (
                "TRITON_INTERPRET=1 was set after the Triton kernels were first loaded for the "
                "GPU; set it before the first call into attrctl.kernels (start a new process)"
            )
        if interpreter_enabled():
            return True, ""
        return False, (
            "the tensors are on the CPU and TRITON_INTERPRET is not set: the Triton kernels need "
            "a CUDA device, or TRITON_INTERPRET=1 in the environment before attrctl.kernels is "
            "first used (slow; for tests)"
        )
    return (
        False,
        f"Triton kernels support CUDA (or CPU under TRITON_INTERPRET=1), not {device.type!r}",
    )


def _loaded_compiled() -> bool:
    # True when the kernel helpers were already decorated in compiled (GPU) mode
    math = sys.modules.get("attrctl.kernels._math")
    return math is not None and type(math._log1p).__name__ != "InterpretedFunction"


def next_power_of_2(n: int) -> int:
    """Smallest power of two ≥ ``n`` (1 for ``n`` ≤ 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def pick_block_v(v: int, config: KernelConfig | None = None) -> int:
    """Vocabulary tile for a row of ``v`` entries.

    Args:
        v: vocabulary size.
        config: an explicit ``block_v`` wins (rounded up to a power of two).

    Returns:
        A power of two ≤ :data:`MAX_BLOCK_V` (≤ :data:`INTERPRET_BLOCK_V` under the interpreter).
    """
    if config is not None and config.block_v is not None:
        if config.block_v < 1:
            raise ValueError(f"block_v must be ≥ 1, got {config.block_v}")
        return next_power_of_2(config.block_v)
    cap = INTERPRET_BLOCK_V if interpreter_enabled() else MAX_BLOCK_V
    return min(next_power_of_2(v), cap)


def pick_num_warps(block_v: int, config: KernelConfig | None = None) -> int:
    """Warps per program: enough threads that each holds ≤ 16 lanes of every tile vector."""
    if config is not None and config.num_warps is not None:
        return config.num_warps
    if block_v >= 4096:
        return 16
    if block_v >= 2048:
        return 8
    return 4


def pick_chunk_rows(n: int, v: int, h: int, chunk_size: int | None) -> int:
    """Rows per chunk of the fused-linear paths.

    The chunk's logits (and head logits) are ``[C, V]``; choosing ``C ≈ N·H/V`` keeps them about
    the size of the hidden states, the same rule as Liger-Kernel's fused linear cross-entropy,
    so the peak memory of the loss stays O(N·H) instead of O(N·V).

    Args:
        n: rows in the batch.
        v: vocabulary size.
        h: hidden size.
        chunk_size: explicit rows per chunk (wins when given).
    """
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be ≥ 1, got {chunk_size}")
        return min(chunk_size, max(n, 1))
    inc_factor = -(-v // max(h, 1))  # ceil(V / H)
    rows = next_power_of_2(-(-max(n, 1) // inc_factor))
    return max(1, min(rows, max(n, 1)))


def fast_fp32_matmul(x: torch.Tensor) -> bool:
    """Whether ``torch.mm(a, b, out_dtype=torch.float32)`` can run for bf16/fp16 ``x`` here.

    The fused-linear paths want fp32 logits (the losses are defined in fp32; rounding logits of
    magnitude 30 to bf16 moves them by 0.06). On CUDA builds that provide ``aten::mm.dtype`` the
    matmul keeps bf16 tensor-core speed and writes fp32; elsewhere the operands are upcast.
    """
    if x.dtype == torch.float32 or x.device.type != "cuda":
        return False
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key("aten::mm.dtype", "CUDA"))
    except (AttributeError, RuntimeError):  # private API: absent → take the portable path
        return False


def mm_f32(a: torch.Tensor, b: torch.Tensor, fast: bool) -> torch.Tensor:
    """``a @ b`` with an fp32 result; ``fast`` from :func:`fast_fp32_matmul` (else upcast)."""
    if fast:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()  # no copy for operands that are fp32 already
