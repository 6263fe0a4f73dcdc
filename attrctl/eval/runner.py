"""One evaluation, start to end: resolve what to evaluate, check every input, measure, write.

Everything a user can get wrong — a run without a finished model, a ``--guided`` folder without
heads, an empty prompt file, a model that does not load — is checked before the first sample is
drawn, and ``eval.json`` is written once, atomically, at the end: a failed evaluation leaves every
earlier result as it was.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from attrctl.errors import AssetError, AttrctlError
from attrctl.eval.settings import EvalSettings

DEFAULT_POLICY = "toxicity"
DEFAULT_EVAL_DIR = Path("runs") / "eval"
#: The method of a run whose policy does not say (``finetune.objective``).
DEFAULT_RUN_METHOD = "regularized"


@dataclass(frozen=True)
class EvalTarget:
    """What is evaluated, resolved and checked.

    Attributes:
        target: the RUN_DIR or MODEL as given.
        run: the finished run, when ``target`` is a run directory.
        policy: the policy whose oracles score the continuations (and whose seed and seq_len
            are the defaults).
        model_spec: what :func:`attrctl.models.load_model` loads.
        base_spec: the base model for the generations' perplexity; None: the model itself.
        guided: the finished run whose heads steer decoding, or None.
    """

    target: str
    run: Any
    policy: Any
    model_spec: str
    base_spec: str | None
    guided: Any = None

    @property
    def label(self) -> str:
        if self.guided is not None:
            return f"{self.guided.policy().name} (guided)"
        return self.run.policy().name if self.run is not None else f"base: {self.target}"

    @property
    def method(self) -> str:
        if self.guided is not None:
            return "nado_decoding"
        if self.run is None:
            return "base"
        return getattr(self.run.policy().finetune, "objective", None) or DEFAULT_RUN_METHOD


@dataclass
class EvalOutcome:
    """What :func:`run_eval` did: the result (``eval.json``'s content), where it went, notes."""

    result: dict[str, Any]
    path: Path
    replaced_settings: list[str] = field(default_factory=list)


def resolve_target(target: str, *, policy: str | None = None, guided: str | None = None):
    """Check and resolve RUN_DIR|MODEL, ``--policy`` and ``--guided`` (no model is loaded).

    Raises:
        AttrctlError: a run directory without a finished model, a ``--guided`` folder that is not
            a finished run with heads, a policy that does not load.
    """
    from attrctl.policy import load_policy
    from attrctl.train.rundir import is_run_dir, open_finished_run

    guide = None
    if guided is not None:
        guide = open_finished_run(guided)
        if guide.heads_dir is None:
            raise AttrctlError(
                f"{guide.root}: the run has no fitted heads to guide decoding with (--guided needs "
                "a finished run whose state.json lists a fitted head)"
            )
    path = Path(target).expanduser()
    if is_run_dir(path) or (path.is_dir() and (path / "state.json").is_file()):
        run = open_finished_run(path)
        run_policy = run.policy()
        pol = load_policy(policy) if policy is not None else run_policy
        return EvalTarget(target, run, pol, str(run.model_dir), run_policy.model, guide)
    if policy is not None:
        pol = load_policy(policy)
    elif guide is not None:
        pol = guide.policy()
    else:
        pol = load_policy(DEFAULT_POLICY)
    return EvalTarget(target, None, pol, target, None, guide)


def output_path(resolved: EvalTarget, out: str | Path | None = None) -> Path:
    """Where the result goes: ``RUN_DIR/eval.json`` for a run, ``runs/eval/<model slug>/eval.json``
    for a model, ``eval_guided.json`` when guided; ``out`` (a folder, or a ``.json`` file) wins."""
    name = "eval_guided.json" if resolved.guided is not None else "eval.json"
    if out is not None:
        out = Path(out).expanduser()
        return out if out.suffix == ".json" else out / name
    if resolved.run is not None:
        return resolved.run.root / name
    return DEFAULT_EVAL_DIR / slug(resolved.target) / name


def slug(spec: str) -> str:
    """A folder name for a model spec (``bundled:smollm2-135m-instruct`` →
    ``bundled-smollm2-135m-instruct``)."""
    return re.sub(r"[^A-Za-z0-9._]+", "-", spec).strip("-.") or "model"


def run_eval(
    target: str,
    *,
    policy: str | None = None,
    guided: str | None = None,
    settings: EvalSettings | None = None,
    out: str | Path | None = None,
    progress: Any = None,
) -> EvalOutcome:
    """Evaluate RUN_DIR|MODEL and write the result (see :func:`evaluate`) atomically.

    Re-evaluating into the same file replaces it; when the earlier result had other settings,
    the outcome names them (the CLI says so), so nothing is replaced silently.
    """
    from attrctl.paths import atomic_write

    resolved = resolve_target(target, policy=policy, guided=guided)
    path = output_path(resolved, out)
    if path.exists() and not path.is_file():
        raise AttrctlError(f"{path}: exists and is not a file; pass another --out")
    result = evaluate(resolved, settings or EvalSettings(), progress=progress)
    replaced = _changed_settings(path, result["settings"])
    with atomic_write(path) as fh:
        json.dump(result, fh, indent=2, sort_keys=True, ensure_ascii=False)
        fh.write("\n")
    return EvalOutcome(result, path, replaced)


def _changed_settings(path: Path, settings: dict[str, Any]) -> list[str]:
    try:
        old = json.loads(path.read_text(encoding="utf-8")).get("settings", {})
    except (OSError, ValueError, AttributeError):
        return []
    return sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))


# ------------------------------------------------------------------------------------ evaluate
def evaluate(
    resolved: EvalTarget, settings: EvalSettings, *, progress: Any = None
) -> dict[str, Any]:
    """Measure attribute control, utility and generation quality of one model or run.

    Args:
        resolved: from :func:`resolve_target`.
        settings: what to measure and how much; ``seed`` None takes the policy's seed.
        progress: something with ``bar(job, total, unit)`` (e.g.
            :class:`attrctl.train.progress.RichProgress`), or None for no bars.

    Returns:
        The ``eval.json`` content (schema in ``attrctl/eval/__init__.py``).
    """
    from attrctl.eval import classify, control, quality, utility
    from attrctl.models import load_model
    from attrctl.policy import compile_policy

    start = time.perf_counter()
    policy = resolved.policy
    seed = policy.seed if settings.seed is None else settings.seed
    window = settings.ppl_window or policy.finetune.seq_len
    settings = replace(settings, seed=seed, ppl_window=window)
    notes: list[str] = []

    # ---- every input, before any work: a bad one fails fast and writes nothing
    if settings.prompts is not None:
        sets = [control.prompt_file(settings.prompts)]
    else:
        sets = control.heldout_prompt_sets()
    compiled = compile_policy(policy)
    loaded = load_model(resolved.model_spec, device=settings.device)
    model, tok = loaded.model, loaded.tokenizer
    del loaded
    processor = _guidance(resolved, model)
    judge = None
    if any(control.is_toxicity(a) for a in compiled.attributes):
        judge, why = control.load_judge()
        notes += [why] if why else []
    heldout_texts = _heldout_texts(settings, notes)
    tasks = _mc_tasks(settings, notes)
    cls_sets = classify.heldout_sets(policy)  # templated sources' held-out rows (classification)

    # ---- attribute control
    n_rows = sum(len(s.prompts) for s in sets) * settings.k
    bar = _bar(progress, "sample", n_rows, "row")
    try:
        rows = control.sample_eval_continuations(
            model, tok, sets, k=settings.k, max_new_tokens=settings.max_new_tokens,
            top_p=settings.top_p, seed=seed, batch_size=settings.batch_size,
            logits_processor=processor, bar=bar,
        )  # fmt: skip
    finally:
        bar.close()
        if processor is not None and hasattr(processor, "close"):
            processor.close()
    if processor is not None:
        notes.append("utility is measured on the model without guidance (heads steer sampling)")
    scored = control.control_results(
        rows, sets, compiled.attributes, judge, k=settings.k, seed=seed,
        resamples=settings.resamples,
    )  # fmt: skip

    # ---- utility of the evaluated model
    heldout = None
    if heldout_texts:
        windows = utility.heldout_windows(tok, heldout_texts, settings.ppl_tokens, window)
        bar = _bar(progress, "held-out ppl", len(windows), "window")
        heldout = utility.windows_perplexity(model, windows, window, bar=bar)
        bar.close()
    mc = None
    if tasks:
        n_choices = sum(len(ex.choices) for t in tasks
                        for ex in utility.mc_examples(t, settings.mc_examples))  # fmt: skip
        bar = _bar(progress, "multiple choice", n_choices, "choice")
        mc = utility.mc_accuracy(model, tok, tasks, max_examples=settings.mc_examples, bar=bar)
        bar.close()

    # ---- classification ROC-AUC on the held-out rows of templated sources, if the policy has any
    n_cls = sum(len(s.rows) for s in cls_sets)
    bar = _bar(progress, "classification", n_cls, "row") if n_cls else None
    classification = classify.classification_results(
        model, tok, cls_sets, seq_len=policy.finetune.seq_len, seed=seed,
        resamples=settings.resamples, bar=bar,
    )  # fmt: skip
    if bar is not None:
        bar.close()

    # ---- generation quality, under the base model, on an even spread of the continuations
    gen_rows = quality.spread(rows, settings.gen_ppl_rows)
    gen_ppl = None
    if gen_rows:
        if resolved.base_spec is not None and resolved.base_spec != resolved.model_spec:
            del model
            base = load_model(resolved.base_spec, device=settings.device).model
        else:
            base = model
        bar = _bar(progress, "generation ppl", len(gen_rows), "row")
        gen_ppl = quality.generation_perplexity(base, tok, gen_rows, bar=bar)
        bar.close()

    from attrctl import __version__
    from attrctl.bench.harness import environment

    record = settings.record()
    record.update(prompt_sets=[s.name for s in sets], judge=control.JUDGE_KIND)
    return {
        "label": resolved.label,
        "method": resolved.method,
        "target": resolved.target,
        "guided": str(resolved.guided.root) if resolved.guided is not None else None,
        "policy": policy.name,
        "settings": record,
        "control": scored,
        "utility": {"heldout_ppl": heldout, "mc": mc},
        "classification": classification,
        "generation": {
            "ppl": gen_ppl,
            "rows": len(gen_rows),
            "base_model": resolved.base_spec or resolved.model_spec,
            "distinct": quality.distinctness([r.text for r in rows]),
        },
        "train_seconds": _train_seconds(resolved.run),
        "eval_seconds": round(time.perf_counter() - start, 3),
        "environment": environment(settings.device),
        "attrctl_version": __version__,
        "notes": notes,
    }


def _heldout_texts(settings: EvalSettings, notes: list[str]) -> list[str]:
    if settings.ppl_tokens == 0:
        return []
    from attrctl.data.shakespeare import load_shakespeare

    try:
        return [p["text"] for p in load_shakespeare("heldout")]
    except AssetError as err:
        notes.append(f"held-out perplexity skipped: {str(err).splitlines()[0]}")
        return []


def _mc_tasks(settings: EvalSettings, notes: list[str]) -> list:
    if settings.mc_examples == 0 or not settings.mc_tasks:
        return []
    from attrctl.tasks import FETCH_HINT, load_task

    tasks, missing = [], []
    for name in settings.mc_tasks:
        try:
            tasks.append(load_task(name, settings.bigbench_root))
        except AssetError:
            missing.append(name)
    if missing and not tasks:
        notes.append(f"multiple choice skipped: BIG-bench tasks not fetched (run: {FETCH_HINT})")
    elif missing:
        notes.append(f"multiple choice without {', '.join(missing)} (not fetched)")
    return tasks


def _guidance(resolved: EvalTarget, model: Any) -> Any:
    if resolved.guided is None:
        return None
    try:
        from attrctl.guided import load_guidance
    except ImportError as err:
        raise AttrctlError(
            f"--guided needs attrctl.guided, which this installation lacks ({err})"
        ) from err
    return load_guidance(resolved.guided, model)


def _train_seconds(run: Any) -> float | None:
    if run is None:
        return None
    # each job's wall time (``wall_s``; older manifests only have the job's own ``seconds``)
    secs = [
        r.get("wall_s", r.get("seconds"))
        for r in run.state.get("jobs", {}).values()
        if isinstance(r, dict)
    ]
    secs = [float(s) for s in secs if isinstance(s, (int, float))]
    return round(sum(secs), 3) if secs else None


class _NoBar:
    def update(self, n: int = 1, **info: Any) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(progress: Any, job: str, total: int, unit: str) -> Any:
    return progress.bar(job, total or None, unit) if progress is not None else _NoBar()
