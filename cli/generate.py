"""``attrctl generate``: sample continuations of a prompt, plain or NADO-guided."""

from __future__ import annotations

import typer

HELP = """Sample continuations of PROMPT from a model, plain or guided by a run's NADO heads.

MODEL is a run directory (its model/final), an `attrctl export` folder, or any model spec (tiny-random, bundled:smollm2-135m-instruct, a hub id, a local folder). Sample k uses the seed row_seed(--seed, "generate", 0, k), so it does not depend on -n.

--guided samples from softmax(ℓ + α·Σ_k w_k·logσ(r_k)) with the run's last fitted heads (MODEL must then be a run or export folder); --heads RUN takes the heads from RUN instead, e.g. to steer the base model (the paper's NADO-decoding baseline).

\b
Examples:
    attrctl generate runs/toxicity "You are such a" -n 4
    attrctl generate runs/toxicity "You are such a" -n 4 --guided --strength 2
    attrctl generate bundled:smollm2-135m-instruct "Hey" --heads runs/toxicity
    attrctl generate tiny-random "Hello" --max-new-tokens 10 --top-p 0.9
"""


def generate(
    model: str = typer.Argument(..., help="Run directory, export folder, or model spec."),
    prompt: str = typer.Argument(..., help="The prompt to continue."),
    guided: bool = typer.Option(False, "--guided", help="Steer with the run's NADO heads."),
    heads: str = typer.Option(
        None, "--heads", help="Take the heads from this run/export folder (implies --guided)."
    ),
    strength: float = typer.Option(1.0, "--strength", help="α: how hard the heads steer."),
    n: int = typer.Option(1, "-n", "--num-samples", help="Continuations to sample."),
    max_new_tokens: int = typer.Option(40, "--max-new-tokens", help="Tokens per sample at most."),
    temperature: float = typer.Option(1.0, "--temperature", help="Softmax temperature (> 0)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus mass in (0, 1]."),
    seed: int = typer.Option(0, "--seed", help="Base seed of the row seeds."),
    device: str = typer.Option("cpu", "--device", help="Torch device (cpu, cuda, cuda:1, …)."),
) -> None:
    from attrctl.generate import generate as run_generate

    res = run_generate(
        model, prompt, n=n, max_new_tokens=max_new_tokens, temperature=temperature,
        top_p=top_p, seed=seed, guided=guided, heads=heads, strength=strength, device=device,
    )  # fmt: skip
    how = f"guided by {res.guided_by} (strength {res.strength:g})" if res.guided_by else "unguided"
    typer.secho(f"model {res.model}, {how}", err=True, dim=True)
    for g in res.generations:
        typer.secho(f"── sample {g.sample + 1}/{n} (seed {g.seed}, {g.tokens} tokens)", dim=True)
        typer.echo(typer.style(g.prompt, dim=True) + typer.style(g.text, bold=True))


generate.__doc__ = HELP


def register(app: typer.Typer) -> None:
    app.command("generate", help=HELP)(generate)
