"""Training-step benchmark rows, shared by ``attrctl bench train`` and ``benchmarks/``.

*Training overhead* (docs/design.md, "Performance measurements"): in one run, on the same
model, batch, sequence length and trainable parameters, the time and peak memory of

* ``sft`` — a plain SFT step as a user would write it without attrctl: the transformers model
  called with ``labels=`` (its default loss), ``backward``, ``clip_grad_norm_``, AdamW step;
* ``sft_fused`` — the same step through attrctl's fused CE with λ = 0 and no heads: the decoder
  forward of :func:`attrctl.heads.forward_with_tap` and the policy's loss impl;
* ``reg`` — the regularized step of the fine-tune job, with the policy's heads (given seeded
  small random weights so the regularizer is not trivially zero) and per-token λ of the policy's
  domains, alternating by row;

plus the throughput of the other two jobs of an iteration: the sampler (generated tokens/s of
:func:`attrctl.sampling.sample_continuations`, the policy's ``regularizer.max_new_tokens``, the
sample job's batch) and one head-fitting step (continuation tokens/s of the fit job's step on
cached features: head features, ``head_fit_loss``, backward, AdamW).

The steps are built from the project's training pieces (``select_trainable``, ``load_heads``,
``forward_with_tap``, ``regularized_lm_loss``, ``head_fit_loss``), and
:func:`attrctl.train.finetune.micro_step` is the very micro-batch the fine-tune job runs.

Data: random token ids ``[batch_size, seq_len]`` from the model's vocabulary (fixed seed); row
``r`` belongs to domain ``r mod D`` of the policy's domains (sorted), and its tokens get that
domain's λ. Every row sees the same ids.

Timing: ``warmup`` untimed steps (AdamW state is created in the first), then ``steps`` timed
steps; the median and spread (min, max) of their wall time. The timed steps run with the default
allocator, as a user's run does (glibc keeps freed blocks below 32 MiB for reuse; larger ones
are mapped afresh, page faults included, every step).

Peak memory (``peak_mb``, step rows and head fit): each row runs in its **own process**
(:func:`attrctl.bench.harness.run_isolated`: forked from a row server that never runs a row), so
rows cannot contaminate each other. After the timed steps, with gradients freed
(``zero_grad(set_to_none=True)``), :data:`MEM_STEPS` more steps run under
:func:`attrctl.bench.harness.peak_memory`, which first switches the allocator to return freed
memory to the OS (so that the resident set follows what is live) and resets the kernel's
high-water mark: ``peak = VmHWM − VmRSS at the reset``, the most a step holds **above the model
+ optimizer baseline** (``base_mb``: libraries, weights, AdamW moments, the heads — total RSS,
reported beside it). The same definition for every row. On CUDA the figures are the allocator's
``max_memory_allocated`` above ``memory_allocated`` at the same point.

Long: five rows built on one setup (model, batch, heads, λ) and measured one way; the
process, memory, timing and table mechanics are in :mod:`attrctl.bench.harness`.
"""

from __future__ import annotations

import importlib
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from attrctl.bench.harness import (
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
from attrctl.train.finetune import micro_step
from attrctl.train.fit import consistency_pairs

#: The rows, in the order they are run and printed.
ROWS = ("sft", "sft_fused", "reg", "sampler", "head_fit")
STEP_ROWS = ("sft", "sft_fused", "reg")
#: Keys every result carries (``--json`` top level); the acceptance test checks them.
REQUIRED_KEYS = (
    "sft_step_s",
    "sft_fused_step_s",
    "reg_step_s",
    "sft_peak_mb",
    "sft_fused_peak_mb",
    "reg_peak_mb",
    "reg_over_sft_time",
    "reg_over_sft_mem",
    "fused_over_sft_time",
    "fused_over_sft_mem",
    "sampler_tokens_per_s",
    "head_fit_tokens_per_s",
)
#: The bar of the training-overhead issue: regularized / plain SFT (time, memory), and the stretch.
BAR = {"time": 1.15, "mem": 1.10}
STRETCH = {"time": 1.05, "mem": 1.00}
PROMPT_LEN = 12  # prompt tokens of a synthetic head-fitting sequence


@dataclass(frozen=True)
class TrainBenchSpec:
    """One row to measure (one fresh process on CPU)."""

    row: str
    policy: str = "toxicity"
    model: str | None = None  # overrides the policy's model (``tiny-random`` for tests)
    overrides: tuple[str, ...] = ()  # ``key=value`` policy overrides, as ``--set``
    steps: int = 5
    warmup: int = 2
    sample_batch: int | None = None  # None: the sample job's batch
    seed: int = 0


@dataclass
class TrainRow:
    """One measured row; ``--json`` lists them under ``rows``."""

    row: str
    median_s: float | None = None
    min_s: float | None = None
    max_s: float | None = None
    repeats: int = 0
    times_s: list[float] = field(default_factory=list)  # every timed step, in order
    rounds: int = 1  # processes the row ran in (their timed steps pooled)
    peak_mb: float | None = None
    base_mb: float | None = None
    tokens: int = 0  # tokens one timed unit processes
    tokens_per_s: float | None = None
    loss: float | None = None  # loss of the last timed step (sanity: finite, rows comparable)
    check: str = ""  # what was checked before timing
    memory_method: str = ""
    error: str | None = None
    setup: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- the training step


def optimizer_step(params: list[torch.Tensor], opt: torch.optim.Optimizer, max_norm: float):
    """Clip, step, free the gradients (as the fine-tune job does after its micro-batches)."""
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return grad_norm


# --------------------------------------------------------------------------- setup


@dataclass
class _Setup:
    compiled: Any
    loaded: Any
    model: Any
    params: list[torch.Tensor]
    device: str
    info: dict[str, Any]


def _load(spec: TrainBenchSpec) -> _Setup:
    """Policy, model and its trainable subset as the fine-tune job prepares them."""
    from attrctl.losses import resolve_impl
    from attrctl.models import load_model
    from attrctl.models.arch import num_layers
    from attrctl.policy import compile_policy, load_policy
    from attrctl.train.weights import select_trainable

    overrides = _overrides(spec)
    policy = load_policy(spec.policy, overrides)
    ft = policy.finetune
    role = policy.schedule.role("finetune")
    if role.threads:
        torch.set_num_threads(role.threads)
    device = role.device
    loaded = load_model(policy.model, device=device)
    n_layers = num_layers(loaded.model)
    note = ""
    if ft.method == "top_layers" and ft.top_layers > n_layers and spec.model:
        # a small override model (tiny-random: 2 layers) cannot train the policy's top 4
        note = f"finetune.top_layers {ft.top_layers} → {n_layers} (the model has {n_layers})"
        policy = load_policy(spec.policy, [*overrides, f"finetune.top_layers={n_layers}"])
        ft = policy.finetune
    compiled = compile_policy(policy)
    torch.manual_seed(spec.seed)
    model = select_trainable(loaded.model, compiled)  # every row: the same setup to report
    params = [p for p in model.parameters() if p.requires_grad]
    info = {
        "policy": policy.name,
        "model": policy.model,
        "batch_size": ft.batch_size,
        "seq_len": ft.seq_len,
        "tokens_per_step": ft.batch_size * (ft.seq_len - 1),
        "method": ft.method,
        "top_layers": ft.top_layers if ft.method == "top_layers" else None,
        "trainable_params": sum(p.numel() for p in params),
        "vocab": int(model.get_output_embeddings().weight.shape[0]),
        "hidden": int(loaded.model.config.hidden_size),
        "layers": n_layers,
        "loss_impl": resolve_impl(policy.loss.impl, torch.device(device)),
        "chunk_size": policy.loss.chunk_size,
        "lam_by_domain": dict(compiled.lam_by_domain),
        "heads": [a.head.model_dump(exclude_none=True) for a in compiled.attributes],
        "device": device,
        "threads": torch.get_num_threads(),
        **({"note": note} if note else {}),
    }
    return _Setup(compiled, loaded, model, params, device, info)


def _batch(st: _Setup, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids [B, T], labels [N] (ids shifted), λ [N]: row r in domain r mod D."""
    ft = st.compiled.policy.finetune
    v = st.info["vocab"]
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, v, (ft.batch_size, ft.seq_len), generator=g)  # [B, T]
    domains = sorted(st.compiled.lam_by_domain)
    lam_row = torch.tensor(
        [st.compiled.lam_for(domains[r % len(domains)]) for r in range(ft.batch_size)],
        dtype=torch.float32,
    )  # [B]
    lam = lam_row.view(-1, 1).expand(-1, ft.seq_len - 1).reshape(-1)  # [N]
    labels = ids[:, 1:].reshape(-1)  # [N]
    return ids.to(st.device), labels.to(st.device), lam.to(st.device)


def _seeded_heads(st: _Setup, seed: int) -> torch.nn.ModuleList:
    """The policy's heads (``load_heads`` with no folder: R_0) given small random weights, so
    that q ≠ p and the regularizer does real work."""
    from attrctl.heads_io import load_heads

    heads = load_heads(st.compiled, st.model, None)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for head in heads:
            head.weight.copy_(torch.randn(head.weight.shape, generator=g) * 0.05)
            head.bias.copy_(torch.randn(head.bias.shape, generator=g) * 0.5)
    return heads.to(st.device)


# --------------------------------------------------------------------------- the rows


def _step_fn(spec: TrainBenchSpec, st: _Setup) -> tuple[Callable[[], torch.Tensor], str]:
    """A function running one full optimizer step of ``spec.row``; and the check it passed."""
    from attrctl.heads import forward_with_tap, head_taps

    ft = st.compiled.policy.finetune
    loss_cfg = st.compiled.policy.loss
    opt = st.compiled.finetune_optimizer(st.params)
    ids, labels, lam = _batch(st, spec.seed)
    st.model.train()

    if spec.row == "sft":

        def step():
            for _ in range(ft.grad_accum):  # the same micro-batches as the fused rows
                loss = st.model(input_ids=ids, labels=ids).loss  # transformers' default CE
                (loss / ft.grad_accum).backward()
            optimizer_step(st.params, opt, ft.max_grad_norm)
            return loss.detach()

        return step, "transformers' own loss"

    heads = _seeded_heads(st, spec.seed) if spec.row == "reg" else torch.nn.ModuleList()
    taps = head_taps(heads)
    lm_weight = st.model.get_output_embeddings().weight  # [V, H]
    lam_used = lam if spec.row == "reg" else torch.zeros_like(lam)

    def forward(x):
        return forward_with_tap(st.model, taps, x)

    def micro():
        return micro_step(
            forward, heads, ids, labels, lam_used, lm_weight,
            attr_weights=st.compiled.attr_weights, impl=loss_cfg.impl,
            chunk_size=loss_cfg.chunk_size, grad_accum=ft.grad_accum,
        )  # fmt: skip

    def step():
        loss = None
        for _ in range(ft.grad_accum):
            out, _ = micro()
            loss = out.loss.detach()
        optimizer_step(st.params, opt, ft.max_grad_norm)
        return loss

    with torch.no_grad():
        hidden, tapped = forward(ids)
        h = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # [N, H]
        reg_heads = [hd.reg_head(tapped[hd.tap][:, :-1]) for hd in heads]
        hf_loss = float(st.model(input_ids=ids, labels=ids).loss) if not heads else None
    kw = {"lam": lam_used, "attr_weights": st.compiled.attr_weights if heads else None}
    check = _check_loss(h, lm_weight, labels, reg_heads, kw, loss_cfg.impl, hf_loss)
    return step, check


#: Relative error allowed between the timed loss (and its hidden-state gradient) and the eager
#: reference: fp32 summation-order noise is ~1e-7 at the SmolLM2 shape; a dropped KL gradient at
#: λ 10 moves the gradient by far more than 1e-4.
CHECK_RTOL = 1e-4


def _check_loss(h, lm_weight, labels, reg_heads, kw, impl, hf_loss) -> str:
    """Correctness before timing: the step's loss and ∂loss/∂hidden on this batch against the
    eager reference (and, without heads, the loss against transformers' own CE)."""
    from attrctl.losses import regularized_lm_loss

    res = []
    for which in (impl, "eager"):
        x = h.detach().requires_grad_()
        out = regularized_lm_loss(x, lm_weight, labels, reg_heads, impl=which, **kw)
        out.loss.backward()
        res.append((out.loss.detach(), x.grad, out.kl))
    (loss, grad, kl), (ref, ref_grad, _) = res
    errs = {
        "loss": abs(float(loss - ref)) / max(abs(float(ref)), 1e-12),
        "grad": float((grad - ref_grad).norm() / ref_grad.norm()),
    }
    if hf_loss is not None:
        errs["vs transformers"] = abs(float(loss) - hf_loss) / abs(hf_loss)
    bad = {k: v for k, v in errs.items() if not v <= CHECK_RTOL}
    if bad:
        raise AttrctlError(f"{impl} loss disagrees with the reference: relative errors {bad}")
    if reg_heads and not float(kl.max()) > 0:
        raise AttrctlError("the seeded heads give KL = 0: the regularizer would do no work")
    return "vs eager" + "".join(f", {k} {v:.1e}" for k, v in errs.items())


def _sampler_fn(spec: TrainBenchSpec, st: _Setup) -> tuple[Callable[[], int], int]:
    """One batch of the sample job; returns a function giving the tokens it generated."""
    from attrctl.data.prompt_sets import load_prompt_set
    from attrctl.sampling import row_seed, sample_continuations
    from attrctl.train.sample import SAMPLE_BATCH, TEMPERATURE, TOP_P

    reg = st.compiled.policy.regularizer
    prompts = [p for ref in reg.prompts for p in load_prompt_set(ref).prompts]
    b = spec.sample_batch or SAMPLE_BATCH
    batch = [prompts[i % len(prompts)] for i in range(b)]
    seeds = [row_seed(spec.seed, "bench", i, 0) for i in range(b)]
    st.model.eval()
    st.info.update(sample_batch=b, max_new_tokens=reg.max_new_tokens)

    def run() -> int:
        toks = sample_continuations(
            st.model, st.loaded.tokenizer, batch, seeds,
            max_new_tokens=reg.max_new_tokens, temperature=TEMPERATURE, top_p=TOP_P,
        )  # fmt: skip
        return sum(len(t) for t in toks)

    return run, b


def _head_fit_fn(spec: TrainBenchSpec, st: _Setup) -> tuple[Callable[[], torch.Tensor], int]:
    """One head-fitting step as the fit job takes it: cached frozen features of ``regularizer.
    batch_size`` sequences (a prompt, then ``max_new_tokens`` continuation tokens; random ids),
    the heads' bodies on the taps, ``head_fit_loss`` on the continuation rows, backward, AdamW."""
    from attrctl.heads import forward_with_tap, head_taps
    from attrctl.losses import head_fit_loss

    reg = st.compiled.policy.regularizer
    model = st.model.eval()
    lm_weight = model.get_output_embeddings().weight.detach().float()  # [V, H]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(st.compiled.policy.seed + 7919)
        heads = st.compiled.build_heads(model)
    heads.to(lm_weight.device).train()
    taps = head_taps(heads)
    g = torch.Generator().manual_seed(spec.seed)
    b, t = reg.batch_size, PROMPT_LEN + reg.max_new_tokens
    ids = torch.randint(0, st.info["vocab"], (b, t), generator=g)  # [b, T]
    rows = torch.zeros(b, t, dtype=torch.bool)  # row (i, j) predicts ids[i, j+1], a continuation
    rows[:, PROMPT_LEN - 1 : t - 1] = True
    first = rows & ~torch.cat([rows.new_zeros(b, 1), rows[:, :-1]], 1)  # no consistency pair
    with torch.no_grad():
        hidden, tapped = forward_with_tap(model, taps, ids.to(st.device))  # features, cached
    hidden_rows = hidden[rows].float()  # [n, H]
    tokens = torch.cat([ids[:, 1:], ids.new_zeros(b, 1)], 1)[rows]  # [n]
    pair = ~first[rows]  # [n]
    y = (torch.rand(len(heads), b, generator=g) < 0.5).float()  # [K, b] sequence labels
    opt = st.compiled.head_optimizer([p for p in heads.parameters() if p.requires_grad])
    impl, mu = st.compiled.policy.loss.impl, reg.consistency_weight / reg.consistency_rows
    st.info.update(fit_batch=b, fit_seq_len=t)

    def step() -> torch.Tensor:
        total = 0.0
        for k, head in enumerate(heads):
            states = head.features(tapped[head.tap])[rows]  # [n, Hk]
            per_row_y = y[k].unsqueeze(1).expand_as(rows)[rows]  # [n]
            out = head_fit_loss(
                hidden_rows, lm_weight, states, head.weight, head.bias, tokens, per_row_y,
                mu=mu, pair_mask=consistency_pairs(pair, reg.consistency_rows, g), impl=impl,
            )  # fmt: skip
            total = total + out.loss
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        return total.detach()

    return step, int(rows.sum())


# --------------------------------------------------------------------------- measurement


#: Steps of the memory phase (after the timed steps); the peak is the largest of them.
MEM_STEPS = 2


def _memory_phase(fn: Callable[[], Any], cuda: bool) -> tuple[float, float, str]:
    """(baseline MiB, peak MiB above it, method) of :data:`MEM_STEPS` more steps of ``fn``, the
    allocator first switched to return freed memory (the timed steps ran with the default one)."""
    with peak_memory(cuda, return_freed=True) as mem:
        for _ in range(MEM_STEPS):
            fn()
    if cuda:
        return mem.base_mb, mem.peak_mb, "cuda max_memory_allocated above memory_allocated"
    method = "VmHWM above VmRSS before the memory steps (model + optimizer baseline), own process"
    if not mem.returns_freed:
        method += "; no glibc: freed memory may stay resident (peak may read low)"
    if not mem.hwm_reset:
        method += "; HWM reset unavailable: includes earlier steps"
    return mem.base_mb, mem.peak_mb, method


def measure(spec: TrainBenchSpec) -> TrainRow:
    """Measure one row in *this* process (:func:`run_rows` gives each row a fresh one).

    Two phases: the timed steps run with the default allocator (as a user's run would: glibc
    keeps and reuses freed blocks below 32 MiB), then the allocator is switched to return
    memory to the OS and :data:`MEM_STEPS` more steps measure the peak.
    """
    if spec.row not in ROWS:
        raise AttrctlError(f"unknown row {spec.row!r}: choose from {', '.join(ROWS)}")
    row = TrainRow(spec.row)
    st = _load(spec)
    cuda = st.device.startswith("cuda")
    warmup, repeats = spec.warmup, spec.steps
    if spec.row in STEP_ROWS:
        fn, row.check = _step_fn(spec, st)
        row.tokens = st.info["tokens_per_step"] * st.compiled.policy.finetune.grad_accum
    elif spec.row == "sampler":
        fn, _ = _sampler_fn(spec, st)
        warmup, repeats = min(warmup, 1), max(1, min(repeats, 3))  # a batch is seconds long
    else:
        fn, row.tokens = _head_fit_fn(spec, st)
    for _ in range(warmup):
        fn()
    times, results = timed_calls(fn, repeats, cuda=cuda)
    last = results[-1]
    row.times_s = times
    row.median_s, row.min_s, row.max_s = spread(times)
    row.repeats = len(times)
    if spec.row == "sampler":  # each call returned the tokens its batch generated
        row.tokens = int(statistics.median(results))
        row.tokens_per_s = sum(results) / sum(times)
    else:
        row.tokens_per_s = row.tokens / row.median_s
        row.loss = float(last)
        if not torch.isfinite(torch.tensor(row.loss)):
            raise AttrctlError(f"{spec.row}: the loss is not finite ({row.loss})")
        row.base_mb, row.peak_mb, row.memory_method = _memory_phase(fn, cuda)
    row.setup = st.info
    return row


#: Modules a row server imports once, before it forks a process per row (imports only: no torch
#: op runs in the server, so each forked row starts its own OpenMP pool from a clean state).
_WARM_IMPORTS = (
    "transformers",
    "transformers.models.llama.modeling_llama",
    "attrctl.heads",
    "attrctl.heads_io",
    "attrctl.losses.chunked",
    "attrctl.losses.eager",
    "attrctl.models",
    "attrctl.policy",
    "attrctl.sampling",
    "attrctl.train.weights",
)


def run_rows(specs: Sequence[TrainBenchSpec], isolate: bool = True) -> list[TrainRow]:
    """Measure rows, each in a fresh process unless ``isolate`` is False.

    A fresh interpreter per row would pay torch's and transformers' imports every time (seconds
    each); instead the row server of :func:`attrctl.bench.harness.run_isolated` imports them once
    (:func:`warm_server`) and forks a child per row.
    """
    if not isolate:
        return [measure(s) for s in specs]
    outcomes = run_isolated(measure_payload, [asdict(s) for s in specs], warm=warm_server)
    return [
        TrainRow(**out.value) if out.error is None else TrainRow(s.row, error=out.error)
        for s, out in zip(specs, outcomes, strict=True)
    ]


def _warm_policy(spec: TrainBenchSpec) -> None:
    """Compile the policy once in the server, on one thread, and throw the result away: the
    imports its oracles pull in (seconds for some) stay loaded for every forked row. One thread:
    a torch op that an oracle's construction runs then never starts an OpenMP pool, which a
    forked child could not use."""
    from attrctl.policy import compile_policy, load_policy

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        compile_policy(load_policy(spec.policy, _overrides(spec)))
    except Exception:  # the row reports the error from its own process
        pass
    finally:
        torch.set_num_threads(threads)


def _overrides(spec: TrainBenchSpec) -> list[str]:
    return list(spec.overrides) + ([f"model={spec.model}"] if spec.model else [])


def _spec(payload: dict[str, Any]) -> TrainBenchSpec:
    return TrainBenchSpec(**{**payload, "overrides": tuple(payload.get("overrides", ()))})


def warm_server(payloads: list[dict[str, Any]]) -> None:
    """The row server's warm-up (:func:`run_rows`): the imports, and the first row's policy."""
    for name in _WARM_IMPORTS:
        importlib.import_module(name)
    if payloads:
        _warm_policy(_spec(payloads[0]))


def measure_payload(payload: dict[str, Any]) -> dict[str, Any]:
    """:func:`measure` of a JSON spec, as JSON (the worker of a row's process)."""
    return asdict(measure(_spec(payload)))


# --------------------------------------------------------------------------- the benchmark


def _pool(runs: list[TrainRow]) -> TrainRow:
    """One row from its rounds: timed steps pooled, the largest peak, the first error."""
    ok = [r for r in runs if r.error is None]
    if len(ok) < len(runs) or not ok:
        return next(r for r in runs if r.error is not None)
    if len(ok) == 1:
        return ok[0]
    row = max(ok, key=lambda r: r.peak_mb or 0.0)  # its peak, baseline and method
    times = [t for r in ok for t in r.times_s]
    row.times_s, row.rounds, row.repeats = times, len(ok), len(times)
    row.median_s, row.min_s, row.max_s = spread(times)
    row.tokens_per_s = row.tokens / row.median_s if row.tokens else row.tokens_per_s
    return row


def run_train_benchmark(
    policy: str = "toxicity",
    *,
    model: str | None = None,
    overrides: Sequence[str] = (),
    steps: int = 5,
    warmup: int = 2,
    rows: Sequence[str] = ROWS,
    sample_batch: int | None = None,
    rounds: int = 2,
    isolate: bool = True,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the rows (each in a fresh process) and return the result: the required keys at the
    top level, then ``rows``, ``setup`` and ``env``.

    The step rows run ``rounds`` times, each time in a new process and in a rotated order
    (sft, fused, reg; then fused, reg, sft; …), and each row's timed steps are pooled: on a
    shared or virtual machine the speed drifts over a minute by more than the differences
    measured (the first row after an idle spell was up to 30% slower), and rotation spreads the
    drift over the rows instead of charging it to one. Peak memory is the largest of the rounds.
    """
    bad = [r for r in rows if r not in ROWS]
    if bad:
        raise AttrctlError(f"unknown row(s) {bad}: choose from {', '.join(ROWS)}")
    if steps < 1 or warmup < 0 or rounds < 1:
        raise AttrctlError(
            f"steps and rounds must be ≥ 1 and warmup ≥ 0; got {steps}, {rounds}, {warmup}"
        )
    from attrctl.policy import load_policy

    # fail fast, in this process, on a bad policy or override (workers would each repeat it)
    load_policy(policy, [*overrides, *([f"model={model}"] if model else [])])
    if progress:
        progress(f"rows {', '.join(rows)}, each in a fresh process …")
    step_rows = [r for r in rows if r in STEP_ROWS]
    order = [
        step_rows[(k + i) % len(step_rows)] for k in range(rounds) for i in range(len(step_rows))
    ]
    order += [r for r in rows if r not in STEP_ROWS]
    specs = [
        TrainBenchSpec(name, policy, model, tuple(overrides), steps, warmup, sample_batch)
        for name in order
    ]
    done = run_rows(specs, isolate)
    measured = {name: _pool([r for r in done if r.row == name]) for name in rows}
    env = environment(next((r.setup["device"] for r in measured.values() if r.setup), "cpu"))
    sft, fused, reg = (measured.get(k, TrainRow(k)) for k in STEP_ROWS)
    out: dict[str, Any] = {
        "sft_step_s": sft.median_s,
        "sft_fused_step_s": fused.median_s,
        "reg_step_s": reg.median_s,
        "sft_peak_mb": sft.peak_mb,
        "sft_fused_peak_mb": fused.peak_mb,
        "reg_peak_mb": reg.peak_mb,
        "reg_over_sft_time": ratio(reg.median_s, sft.median_s),
        "reg_over_sft_mem": ratio(reg.peak_mb, sft.peak_mb),
        "fused_over_sft_time": ratio(fused.median_s, sft.median_s),
        "fused_over_sft_mem": ratio(fused.peak_mb, sft.peak_mb),
        "sampler_tokens_per_s": measured.get("sampler", TrainRow("")).tokens_per_s,
        "head_fit_tokens_per_s": measured.get("head_fit", TrainRow("")).tokens_per_s,
    }
    out["bar"] = _verdict(out)
    out["memory_method"] = next((r.memory_method for r in measured.values() if r.memory_method), "")
    out["setup"] = next((r.setup for r in measured.values() if r.setup), {})
    out["rows"] = [asdict(r) for r in measured.values()]
    out["env"] = env
    return out


def _verdict(out: dict[str, Any]) -> dict[str, Any]:
    t, m = out["reg_over_sft_time"], out["reg_over_sft_mem"]
    if t is None or m is None:
        return {"met": None, "stretch": None}
    return {
        "time": BAR["time"], "mem": BAR["mem"],
        "met": t <= BAR["time"] and m <= BAR["mem"],
        "stretch": t <= STRETCH["time"] and m <= STRETCH["mem"],
    }  # fmt: skip


def format_train_table(result: dict[str, Any]) -> str:
    """The result as Markdown: the three steps side by side, ratios, throughputs, setup, env."""
    rows = {r["row"]: r for r in result["rows"]}

    def step_cell(name: str, key: str, spec: str) -> str:
        r = rows.get(name)
        if r is None:
            return "—"
        if r.get("error"):
            return r["error"]
        if key == "time":
            lo, hi = cell(r["min_s"], ".3f"), cell(r["max_s"], ".3f")
            return f"{cell(r['median_s'], '.3f')} ({lo}–{hi})"
        if key == "n":
            return f"{r['repeats']} in {r.get('rounds', 1)}"
        return cell(r.get(key), spec)

    def line(label: str, key: str, spec: str = "", last: tuple[str, str] = ("", "")) -> str:
        """One table line: the three step rows' ``key``, then ``last`` (the two ratio cells)."""
        return markdown_row([label, *(step_cell(n, key, spec) for n in STEP_ROWS), *last])

    def ratio_cells(what: str) -> tuple[str, str]:
        fused, reg = result[f"fused_over_sft_{what}"], result[f"reg_over_sft_{what}"]
        return cell(fused, ".3f"), f"**{cell(reg, '.3f')}**"

    header = ["", "plain SFT (transformers `labels=`)", "fused CE, λ = 0", "regularized",
              "fused / SFT", "regularized / SFT"]  # fmt: skip
    lines = [
        markdown_row(header),
        markdown_rule(len(header)),
        line("step s, median (min–max)", "time", last=ratio_cells("time")),
        line("peak MiB above baseline", "peak_mb", ".0f", last=ratio_cells("mem")),
        line("timed steps in processes", "n"),
        line("baseline RSS MiB (model + optimizer)", "base_mb", ".0f"),
        line("tokens/s", "tokens_per_s", ".0f"),
    ]
    s, bar = result.get("setup", {}), result.get("bar", {})
    verdict = (
        "—" if bar.get("met") is None
        else ("met" if bar["met"] else "NOT met") + (", stretch met" if bar["stretch"] else "")
    )  # fmt: skip
    sampler, fit = rows.get("sampler", {}), rows.get("head_fit", {})
    lines += [
        "",
        f"bar (regularized ≤ {BAR['time']}× time, ≤ {BAR['mem']}× memory of plain SFT): "
        f"{verdict}; stretch ≤ {STRETCH['time']}× time, ≤ {STRETCH['mem']}× memory",
        f"sampler: {cell(result['sampler_tokens_per_s'], '.0f')} generated tokens/s "
        f"(batch {sampler.get('setup', {}).get('sample_batch', '—')}, "
        f"{sampler.get('setup', {}).get('max_new_tokens', '—')} new tokens)"
        + (f" {sampler['error']}" if sampler.get("error") else ""),
        f"head fit: {cell(result['head_fit_tokens_per_s'], '.0f')} tokens/s "
        f"(step {cell(fit.get('median_s'), '.3f')} s on {fit.get('tokens', '—')} continuation tokens)"
        + (f" {fit['error']}" if fit.get("error") else ""),
        f"setup: {s.get('model')} · batch {s.get('batch_size')} × {s.get('seq_len')} · "
        f"{s.get('method')} (top {s.get('top_layers')}) · {s.get('trainable_params')} trainable "
        f"params · loss {s.get('loss_impl')} · heads {s.get('heads')} · λ {s.get('lam_by_domain')}"
        + (f" · {s['note']}" if s.get("note") else ""),
        f"memory: {result.get('memory_method')}",
    ]
    env = result.get("env", {})
    lines.append(
        f"env: {env.get('device_name')} · {s.get('threads')} threads · torch {env.get('torch')} · "
        f"git {env.get('git_commit')} · {env.get('time')}"
    )
    return "\n".join(lines)
