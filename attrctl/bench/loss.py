"""Loss benchmark rows, shared by ``attrctl bench loss`` and ``benchmarks/``.

One *row* is one (impl, mode, shape, N, dtype) measurement: inputs shaped like a real model's
LM head (hidden [N, H], lm_weight [V, H], one regularizer head reading the same hidden states,
per-token λ, 10% ignored labels), ``warmup`` untimed calls, then ``repeats`` timed calls;
median and spread (min, max) of the wall time, and peak memory.

Modes: ``fwd`` is the forward alone with inputs that do not require grad (what evaluation
pays); ``fwd_bwd`` is forward + ``backward()`` with gradients to hidden and lm_weight.

Impls: ``eager``, ``chunked``, ``triton`` (CUDA or TRITON_INTERPRET=1), ``compile``
(``torch.compile`` of the eager loss) and, on CUDA with ``liger_kernel`` installed, ``liger``
(Liger-Kernel's fused linear cross-entropy, the closest public fused-linear analogue; it has no
KL term, so its row is a lower bound for a fused loss).

Correctness is checked before timing: each impl's loss and gradients at the row's H, V, dtype
and a small N must match ``eager`` to a relative tolerance (:data:`CHECK_RTOL`) tight enough to
fail a wrong KL gradient (rows that fail are reported with ``error`` and not timed).

Peak memory (``peak_mb``): the most memory the timed calls hold at once *above* what the process
held when they started (inputs, weights, libraries), measured by
:func:`attrctl.bench.harness.peak_memory` from the end of the warm-up: on CUDA the allocator's
statistics; on CPU the kernel's resident-set high-water mark, each row in a **fresh process**
(:func:`attrctl.bench.harness.run_isolated`, a new interpreter per row) started with
:data:`~attrctl.bench.harness.MALLOC_RETURNS_MEMORY_ENV`, so that glibc returns freed blocks to the
OS for the whole row, timed calls included. Rows cannot contaminate each other, and compile-time
memory of ``torch.compile`` (spent in the warm-up) is not counted.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from attrctl.bench.harness import (
    MALLOC_RETURNS_MEMORY_ENV,
    cell,
    environment,
    markdown_row,
    markdown_rule,
    peak_memory,
    ratio,
    run_isolated,
    spread,
    timed_calls,
)
from attrctl.errors import AttrctlError

#: Model LM-head shapes: name → (hidden H, vocabulary V).
MODEL_SHAPES: dict[str, tuple[int, int]] = {
    "smollm2": (576, 49_152),
    "llama2": (4096, 32_000),
    "llama3": (4096, 128_256),
}
IMPLS = ("eager", "chunked", "compile", "triton", "liger")
MODES = ("fwd", "fwd_bwd")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CHECK_N = 64  # rows of the correctness check (full H and V)


@dataclass(frozen=True)
class RowSpec:
    """One measurement to make."""

    impl: str
    mode: str
    shape: str
    H: int
    V: int
    N: int
    dtype: str = "fp32"
    device: str = "cpu"
    heads: int = 1
    warmup: int = 1
    repeats: int = 3
    seed: int = 0


@dataclass
class BenchRow:
    """One measured row; the ``--json`` schema (environment fields repeated on every row)."""

    impl: str
    mode: str
    shape: str
    H: int
    V: int
    N: int
    dtype: str
    device: str
    heads: int
    median_ms: float | None = None
    min_ms: float | None = None
    max_ms: float | None = None
    repeats: int = 0
    peak_mb: float | None = None
    memory_method: str = ""
    max_abs_err: float | None = None
    time_vs_eager: float | None = None
    mem_vs_eager: float | None = None
    time_vs_compile: float | None = None
    error: str | None = None
    env: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------- inputs and calls


def make_inputs(spec: RowSpec, n: int | None = None) -> dict:
    """Model-shaped inputs for ``spec`` (``n`` overrides the row count, for correctness checks)."""
    n = spec.N if n is None else n
    g = torch.Generator().manual_seed(spec.seed)
    dt = DTYPES[spec.dtype]
    hidden = torch.randn(n, spec.H, generator=g).to(dt)
    # 1/sqrt(H) scaling gives logits of realistic magnitude (std ≈ 2)
    lm_weight = (torch.randn(spec.V, spec.H, generator=g) * (2 / spec.H**0.5)).to(dt)
    labels = torch.randint(0, spec.V, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.1] = -100
    head_w = [(torch.randn(spec.V, spec.H, generator=g) * (1 / spec.H**0.5)).to(dt)]
    head_w += [head_w[0].roll(k, 0) for k in range(1, spec.heads)]  # distinct, cheap to make
    lam = torch.where(torch.rand(n, generator=g) < 0.5, 1.0, 0.1)  # two "domains"
    dev = torch.device(spec.device)
    return {
        "hidden": hidden.to(dev),
        "lm_weight": lm_weight.to(dev),
        "labels": labels.to(dev),
        "head_weights": [w.to(dev) for w in head_w],
        "lam": lam.to(dev),
    }


def _liger_call():
    if importlib.util.find_spec("liger_kernel") is None:
        raise AttrctlError("impl 'liger' needs liger-kernel (pip install liger-kernel) and CUDA")
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss_fn = LigerFusedLinearCrossEntropyLoss(ignore_index=-100)

    def call(inp):
        return loss_fn(inp["lm_weight"], inp["hidden"], inp["labels"])

    return call


def make_call(impl: str) -> Callable[[dict], torch.Tensor]:
    """A function of the inputs that returns the scalar loss of ``impl``."""
    from attrctl.losses import RegHead, regularized_lm_loss
    from attrctl.losses import eager as eager_mod
    from attrctl.losses.types import LossOptions

    if impl == "liger":
        return _liger_call()

    def heads(inp):
        h = inp["hidden"].detach()  # the head reads the LM's hidden states, frozen
        return [RegHead(h, w, None) for w in inp["head_weights"]]

    if impl == "compile":
        compiled = torch.compile(eager_mod.regularized_lm_loss)
        opts = LossOptions()

        def call(inp):
            k = len(inp["head_weights"])
            w = torch.ones(k, dtype=torch.float32, device=inp["hidden"].device)
            args = (inp["hidden"], inp["lm_weight"], inp["labels"], heads(inp), w, inp["lam"])
            return compiled(*args, opts).loss

        return call

    def call(inp):
        return regularized_lm_loss(
            inp["hidden"], inp["lm_weight"], inp["labels"], heads(inp), lam=inp["lam"], impl=impl
        ).loss

    return call


def make_step_inputs(spec: RowSpec) -> dict:
    """:func:`make_inputs`, with gradients requested on the trained tensors for ``fwd_bwd``."""
    inp = make_inputs(spec)
    if spec.mode == "fwd_bwd":
        inp["hidden"].requires_grad_()
        inp["lm_weight"].requires_grad_()
    return inp


def run_step(call, inp: dict, mode: str) -> torch.Tensor:
    """One timed unit: a forward (no grad) or a forward + backward of ``call`` on ``inp``."""
    if mode == "fwd":
        with torch.no_grad():
            return call(inp)
    inp["hidden"].grad = inp["lm_weight"].grad = None
    loss = call(inp)
    loss.backward()
    return loss


#: Tolerances of the correctness gate: ``‖impl − eager‖ / ‖eager‖`` for the loss and for each
#: gradient, so that the O(1/N) gradients are not judged against the O(1..10) loss. "fp32": the
#: impls differ only in summation order, measured ~1e-7 (CPU, H 576, V 49,152, N 64); 1e-4 leaves
#: room for other BLAS libraries and GPUs. "reduced" (bf16 inputs, or TF32 matmuls): the triton
#: path feeds the logits gradient to its matmuls in bf16 as autograd would, ~2.5e-3 at the SmolLM2
#: shape (bf16-rounding that gradient on CPU); 5e-3. Both gates must catch a broken KL gradient:
#: at the check's λ = 1, dropping the whole KL term moves the gradients by 1.3e-2 (SmolLM2) and
#: 1.5e-2 (Llama-2), flipping its sign by twice that. (The previous gate, max |Δ| ≤ 1e-3·loss,
#: let a missing KL term through: the gradients are ~1e-3·loss themselves.)
CHECK_RTOL = {"fp32": 1e-4, "reduced": 5e-3}


def _check_rtol(spec: RowSpec) -> float:
    reduced = spec.dtype != "fp32" or torch.get_float32_matmul_precision() != "highest"
    if spec.device.startswith("cuda") and torch.backends.cuda.matmul.allow_tf32:
        reduced = True
    return CHECK_RTOL["reduced" if reduced else "fp32"]


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    diff = (got - ref).norm().item()
    size = ref.norm().item()
    return diff / size if size > 0 else diff


def check_correctness(spec: RowSpec) -> float:
    """Compare ``spec.impl`` with ``eager`` at ``CHECK_N`` rows; returns the max ``|impl − eager|``.

    The loss and the gradients of hidden and lm_weight are compared by relative norm error
    against :data:`CHECK_RTOL`. λ = 1 on every row (the timed inputs mix 1 and 0.1): the KL
    term's share of the gradients is then large enough that a wrong KL gradient cannot hide
    under the tolerance.

    Raises:
        AttrctlError: an output differs by more than the tolerance (the message names which).
    """
    small = RowSpec(**{**asdict(spec), "N": min(spec.N, CHECK_N)})
    results = []
    for impl in ("eager", spec.impl):
        inp = make_inputs(small)
        inp["lam"] = torch.ones_like(inp["lam"])
        for key in ("hidden", "lm_weight"):
            inp[key].requires_grad_(spec.impl != "liger")
        loss = make_call(impl)(inp)
        if spec.impl == "liger":
            results.append([loss.detach().float()])
            continue
        loss.backward()
        grads = [inp["hidden"].grad.float(), inp["lm_weight"].grad.float()]
        results.append([loss.detach().float(), *grads])
    if spec.impl == "liger":
        return float("nan")  # a CE-only analogue: not comparable to the regularized loss
    ref, got = results
    tol = _check_rtol(spec)
    names = ("loss", "grad hidden", "grad lm_weight")
    rel = {name: _rel_err(g, r) for name, g, r in zip(names, got, ref, strict=True)}
    bad = [f"{name} {err:.3g}" for name, err in rel.items() if not err <= tol]  # NaN fails too
    if bad:
        raise AttrctlError(
            f"{spec.impl} disagrees with eager: relative error {', '.join(bad)} (> {tol:g})"
        )
    return max((g - r).abs().max().item() for g, r in zip(got, ref, strict=True))


# --------------------------------------------------------------------------- measurement


def _row_for(spec: RowSpec) -> BenchRow:
    """An untimed row carrying the spec's identifying fields."""
    return BenchRow(
        **{k: getattr(spec, k) for k in BenchRow.__dataclass_fields__ if hasattr(spec, k)}
    )


def measure(spec: RowSpec) -> BenchRow:
    """Time one row in *this* process (use :func:`run_row` for isolated CPU memory figures)."""
    row = _row_for(spec)
    inp = make_step_inputs(spec)
    call = make_call(spec.impl)
    cuda = spec.device.startswith("cuda")

    def step() -> None:
        run_step(call, inp, spec.mode)

    def free_grads() -> None:
        inp["hidden"].grad = inp["lm_weight"].grad = None

    for _ in range(spec.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
    free_grads()
    with peak_memory(cuda) as mem:
        times, _ = timed_calls(step, spec.repeats, cuda=cuda, after=free_grads)
    if cuda:
        row.memory_method = "cuda max_memory_allocated - memory_allocated before"
    elif mem.hwm_reset:
        row.memory_method = "VmHWM - VmRSS after warm-up (HWM reset), fresh process"
    else:
        row.memory_method = "ru_maxrss - VmRSS (HWM reset unavailable: includes warm-up)"
    times_ms = [t * 1e3 for t in times]
    row.median_ms, row.min_ms, row.max_ms = spread(times_ms)
    row.repeats = len(times_ms)
    row.peak_mb = mem.peak_mb
    return row


def run_row(spec: RowSpec, isolate: bool | None = None) -> BenchRow:
    """Measure one row, in a fresh process on CPU (so memory peaks cannot mix). A row that fails
    there (an out-of-memory kill at a large shape, say) comes back with ``error``."""
    isolate = not spec.device.startswith("cuda") if isolate is None else isolate
    if not isolate:
        return measure(spec)
    (out,) = run_isolated(measure_payload, [asdict(spec)], env=MALLOC_RETURNS_MEMORY_ENV)
    if out.error is not None:
        row = _row_for(spec)
        row.error = out.error
        return row
    return BenchRow(**out.value)


def measure_payload(spec: dict[str, Any]) -> dict[str, Any]:
    """:func:`measure` of a JSON spec, as JSON (the worker of :func:`run_row`'s process)."""
    return asdict(measure(RowSpec(**spec)))


def _attach_ratios(rows: list[BenchRow]) -> None:
    def key(r):
        return (r.mode, r.shape, r.H, r.V, r.N, r.dtype, r.device)

    by = {(key(r), r.impl): r for r in rows if r.median_ms is not None}
    for r in rows:
        if r.median_ms is None:
            continue
        eager = by.get((key(r), "eager"))
        comp = by.get((key(r), "compile"))
        if eager is not None:
            r.time_vs_eager = ratio(r.median_ms, eager.median_ms)
            r.mem_vs_eager = ratio(r.peak_mb, eager.peak_mb)
        if comp is not None:
            r.time_vs_compile = ratio(r.median_ms, comp.median_ms)


def resolve_shapes(names: Sequence[str]) -> list[tuple[str, int, int]]:
    """Model names (``smollm2``, ``llama2``, ``llama3``) or ``HxV`` (e.g. ``64x1000``)."""
    out = []
    for name in names:
        if name in MODEL_SHAPES:
            out.append((name, *MODEL_SHAPES[name]))
            continue
        try:
            h, v = (int(x) for x in name.lower().split("x"))
        except ValueError:
            known = ", ".join(MODEL_SHAPES)
            raise AttrctlError(f"unknown shape {name!r}: use one of {known} or HxV") from None
        out.append((name, h, v))
    return out


def run_loss_benchmark(
    *,
    shapes: Sequence[str] = ("smollm2",),
    ns: Sequence[int] = (512,),
    impls: Sequence[str] = ("eager", "chunked"),
    modes: Sequence[str] = MODES,
    dtype: str = "fp32",
    device: str = "cpu",
    heads: int = 1,
    warmup: int = 1,
    repeats: int = 3,
    isolate: bool | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[BenchRow]:
    """Benchmark the loss impls over shapes × N × modes; returns rows with ratios filled in."""
    bad = [i for i in impls if i not in IMPLS]
    if bad:
        raise AttrctlError(f"unknown impl(s) {bad}: choose from {', '.join(IMPLS)}")
    if any(m not in MODES for m in modes):
        raise AttrctlError(f"modes must be among {', '.join(MODES)}; got {list(modes)}")
    if dtype not in DTYPES:
        raise AttrctlError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise AttrctlError("device cuda requested but torch sees no CUDA device")
    env = environment(device)
    rows: list[BenchRow] = []
    for shape, h, v in resolve_shapes(shapes):
        for impl in impls:
            check = RowSpec(impl, "fwd_bwd", shape, h, v, min(ns), dtype, device, heads)
            try:
                err = check_correctness(check) if impl != "eager" else 0.0
            except (AttrctlError, RuntimeError, ImportError) as exc:
                for n in ns:
                    for mode in modes:
                        row = BenchRow(impl, mode, shape, h, v, n, dtype, device, heads)
                        row.error, row.env = f"not timed: {exc}", env
                        rows.append(row)
                continue
            for n in ns:
                for mode in modes:
                    spec = RowSpec(
                        impl, mode, shape, h, v, n, dtype, device, heads, warmup, repeats
                    )
                    if progress:
                        progress(f"{impl:8s} {mode:7s} {shape} H={h} V={v} N={n} {dtype}")
                    row = run_row(spec, isolate)
                    row.max_abs_err, row.env = err, env
                    rows.append(row)
    _attach_ratios(rows)
    return rows


def plot_rows(rows: Sequence[BenchRow], path: str | Path) -> Path:
    """Write a PNG: median time and peak memory vs N, one line per (impl, mode, shape)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    groups: dict[str, list[BenchRow]] = {}
    for r in rows:
        if r.median_ms is not None:
            groups.setdefault(f"{r.impl} {r.mode} {r.shape} {r.dtype}", []).append(r)
    for label, rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r.N)
        ns = [r.N for r in rs]
        ax_t.plot(ns, [r.median_ms for r in rs], marker="o", label=label)
        ax_m.plot(ns, [r.peak_mb for r in rs], marker="o", label=label)
    for ax, what in ((ax_t, "median time (ms)"), (ax_m, "peak memory above inputs (MiB)")):
        ax.set_xlabel("N (tokens)")
        ax.set_ylabel(what)
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    ax_m.legend(fontsize=7)
    env = next((r.env for r in rows if r.env), {})
    fig.suptitle(f"attrctl loss benchmark — {env.get('device_name', '')} torch {env.get('torch')}")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_table(rows: Sequence[BenchRow]) -> str:
    """A Markdown table of the rows (the README's benchmark table)."""
    header = ["impl", "mode", "shape (H×V)", "N", "dtype", "median ms (min–max)", "peak MiB",
              "time/eager", "mem/eager", "time/compile"]  # fmt: skip
    lines = [markdown_row(header), markdown_rule(len(header))]
    for r in rows:
        if r.error:  # the error in the time column, the cells after it empty
            lines.append(
                markdown_row([r.impl, r.mode, r.shape, str(r.N), r.dtype, r.error]) + "||||"
            )
            continue
        lines.append(markdown_row([
            r.impl, r.mode, f"{r.shape} ({r.H}×{r.V})", str(r.N), r.dtype,
            f"{cell(r.median_ms, '.0f')} ({cell(r.min_ms, '.0f')}–{cell(r.max_ms, '.0f')})",
            cell(r.peak_mb, ".0f"), cell(r.time_vs_eager, ".2f"), cell(r.mem_vs_eager, ".2f"),
            cell(r.time_vs_compile, ".2f"),
        ]))  # fmt: skip
    return "\n".join(lines)
