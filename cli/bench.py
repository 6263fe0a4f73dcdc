"""``attrctl bench``: benchmarks of the fused losses and of a training step (the rows live in
``attrctl.bench.loss`` and ``attrctl.bench.train``, their shared harness in
``attrctl.bench.harness``)."""

from __future__ import annotations

import json
from dataclasses import asdict

import typer

from attrctl.bench.loss import format_table, plot_rows, run_loss_benchmark

app = typer.Typer(help="Benchmark the regularized losses and training step.", no_args_is_help=True)


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


@app.command("loss")
def loss(
    shapes: str = typer.Option("smollm2", help="Comma list: smollm2, llama2, llama3 or HxV."),
    n: str = typer.Option("512", "--n", help="Comma list of token counts N."),
    impls: str = typer.Option(
        "eager,chunked", help="Comma list of eager, chunked, compile, triton, liger."
    ),
    modes: str = typer.Option("fwd,fwd_bwd", help="Comma list of fwd, fwd_bwd."),
    dtype: str = typer.Option("fp32", help="fp32 or bf16."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    heads: int = typer.Option(1, help="Regularizer heads (attributes)."),
    repeats: int = typer.Option(3, help="Timed calls per row (after one warm-up)."),
    as_json: bool = typer.Option(False, "--json", help="Print the rows as a JSON list."),
    plot: str | None = typer.Option(None, "--plot", help="Write a PNG of time/memory vs N."),
) -> None:
    """Time and memory of the loss impls at model shapes (each CPU row in a fresh process).

    Acceptance run: attrctl bench loss --n 2048 --impls eager,chunked --modes fwd_bwd --json
    """
    rows = run_loss_benchmark(
        shapes=_csv(shapes), ns=[int(x) for x in _csv(n)], impls=_csv(impls),
        modes=_csv(modes), dtype=dtype, device=device, heads=heads, repeats=repeats,
        progress=None if as_json else (lambda msg: typer.echo(f"running {msg}", err=True)),
    )  # fmt: skip
    if as_json:
        typer.echo(json.dumps([asdict(r) for r in rows], indent=1))
    else:
        typer.echo(format_table(rows))
    if plot:
        typer.echo(f"plot: {plot_rows(rows, plot)}", err=True)


@app.command("train")
def train(
    policy: str = typer.Option("toxicity", "--policy", "-p", help="Policy name or YAML path."),
    model: str | None = typer.Option(None, help="Override the policy's model (e.g. tiny-random)."),
    steps: int = typer.Option(5, help="Timed steps per row and round, after warm-up."),
    rounds: int = typer.Option(
        2, help="Processes per step row, in rotated order; the median pools their steps."
    ),
    warmup: int = typer.Option(2, help="Untimed steps first (AdamW state is made in the first)."),
    rows: str = typer.Option(
        "sft,sft_fused,reg,sampler,head_fit", help="Comma list of rows to run."
    ),
    sample_batch: int | None = typer.Option(
        None, help="Sampler batch (default: the sample job's)."
    ),
    overrides: list[str] = typer.Option(
        [], "--set", help="Policy override KEY=VALUE (repeatable)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Plain transformers SFT step vs fused CE (λ = 0) vs the regularized step: time, peak memory
    and their ratios, plus sampler and head-fit throughput (each row in a fresh process).

    Acceptance run: attrctl bench train --policy toxicity
    """
    from attrctl.bench.train import format_train_table, run_train_benchmark

    result = run_train_benchmark(
        policy, model=model, overrides=overrides, steps=steps, warmup=warmup, rows=_csv(rows),
        sample_batch=sample_batch, rounds=rounds,
        progress=None if as_json else (lambda msg: typer.echo(f"running {msg}", err=True)),
    )  # fmt: skip
    typer.echo(json.dumps(result, indent=1) if as_json else format_train_table(result))


@app.command("sampler")
def sampler(
    model: str = typer.Option("bundled:smollm2-135m-instruct", help="Model spec to sample from."),
    rows: int = typer.Option(64, help="Prompts sampled at once (the sample job's batch)."),
    max_new_tokens: int = typer.Option(20, help="Tokens per continuation."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Where the sampler's time goes and how close it runs to its matmul floor: one batch of the
    training prompts sampled with top-p 0.9 under the profiler, its time split into the matrix
    products, the top-p/sampling ops and the rest, beside the same weight matmuls timed alone.

    Acceptance run: attrctl bench sampler
    """
    from attrctl.bench.sampler import describe, profile_sampler
    from attrctl.data.prompt_sets import load_prompt_set
    from attrctl.models import load_model

    loaded = load_model(model)
    prompts = list(load_prompt_set("toxic").prompts)
    prompts = (prompts * (rows // len(prompts) + 1))[:rows]
    result = profile_sampler(loaded.model, loaded.tokenizer, prompts,
                             max_new_tokens=max_new_tokens)  # fmt: skip
    typer.echo(json.dumps(result, indent=1) if as_json else describe(result))


@app.command("gpu")
def gpu(
    out: str = typer.Option("gpu_check", "--out", help="Folder for gpu_check.json / .md."),
    quick: bool = typer.Option(False, help="One token count per loss row instead of two."),
) -> None:
    """The day a GPU is lent: the gpu-marked tests, `bench loss` at SmolLM2 and Llama-2 shapes in
    bf16 (eager, chunked, torch.compile, Triton, Liger if installed) and a short bf16 regularized
    fine-tune on CUDA, in one JSON + Markdown report; about 8 minutes on one H100. Without CUDA
    every part is reported as skipped. Exits 1 when a part failed.

    Acceptance run: attrctl bench gpu --out gpu_check
    """
    from pathlib import Path

    from attrctl.bench.gpucheck import describe, exit_code, gpu_check

    report = gpu_check(Path(out), quick=quick)
    typer.echo(describe(report))
    raise typer.Exit(exit_code(report))
