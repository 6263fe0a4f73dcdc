"""``attrctl eval``: attribute control, utility and generation quality of a run or a model.

The three promises (docs/design.md, "What attrctl promises"), measured as the paper measures them:

1. **Attribute control** (:mod:`attrctl.eval.control`) — the RealToxicityPrompts protocol: ``k``
   continuations (default 25, top-p 0.9, 20 tokens) of every prompt of a held-out prompt set that
   training never sees, scored by the policy's oracles and by an independent judge
   (``jigsaw_bilstm``) that training never used; expected maximum violation, violation
   probability, mean violation and fraction of violating continuations, each with a seeded 95%
   bootstrap interval over prompts (:mod:`attrctl.eval.metrics`).
2. **Utility** (:mod:`attrctl.eval.utility`) — perplexity on held-out Shakespeare plays, and
   zero-shot multiple-choice accuracy on the fetched BIG-bench tasks beside chance.
3. **Generation quality** (:mod:`attrctl.eval.quality`) — perplexity of the continuations under
   the base model (on an even spread of at most ``gen_ppl_rows`` of them), and distinct-1/2/3.

The result (``RUN_DIR/eval.json``; ``eval_guided.json`` with ``--guided``; a model's under
``runs/eval/<model>/``) has this schema, which ``attrctl report`` reads::

    label            str    the row's name: the run's policy, "base: <model>", "<policy> (guided)"
    method           str    the run policy's finetune.objective (else "regularized"); "base" for a
                            plain model; "nado_decoding" when heads steer decoding
    target           str    RUN_DIR or MODEL as given
    guided           str | null     the run whose heads steered decoding
    policy           str    the policy whose oracles scored
    settings         {k, top_p, max_new_tokens, seed, prompt_sets, prompts, ppl_tokens,
                      ppl_window, mc_examples, mc_tasks, gen_ppl_rows, resamples, batch_size,
                      device, judge, ...}
    control          {<prompt set> and "all": {<attribute>: {"oracle": M, "judge": M | null}}}
        M = {"expected_max" | "probability" | "mean" | "fraction": {"value", "ci": [lo, hi]},
             "prompts", "samples", "threshold"}
    utility          {"heldout_ppl": {"value", "tokens", "window"} | null,
                      "mc": {"tasks": {name: {"accuracy", "stderr", "chance", "n"}},
                             "accuracy", "stderr", "chance"} | null}
    classification   {<templated source>: {"roc_auc": {"value", "ci"}, "texts", "positives",
                      "groups", "positive_label", "label_words"}} | null — ROC-AUC on the
                      held-out rows of the policy's templated sources (:mod:`attrctl.eval.classify`)
    generation       {"ppl" | null, "rows": scored for ppl, "base_model",
                      "distinct": {"1", "2", "3"}}
    train_seconds    float | null   sum of the run's job times (state.json)
    eval_seconds     float
    environment      {device_name, threads, torch, triton, python, git_commit, time}
    attrctl_version  str
    notes            [str]  what was skipped and why (judge not installed, tasks not fetched, ...)

Importing this package is cheap; models load when :func:`evaluate` runs.
"""

from __future__ import annotations

from typing import Any

from attrctl.eval.settings import DEFAULT_MC_TASKS, EvalSettings

__all__ = [
    "DEFAULT_MC_TASKS",
    "EvalSettings",
    "evaluate",
    "output_path",
    "resolve_target",
    "run_eval",
    "summary_lines",
]


def resolve_target(*args: Any, **kwargs: Any):
    """See :func:`attrctl.eval.runner.resolve_target`."""
    from attrctl.eval.runner import resolve_target as _resolve

    return _resolve(*args, **kwargs)


def output_path(*args: Any, **kwargs: Any):
    """See :func:`attrctl.eval.runner.output_path`."""
    from attrctl.eval.runner import output_path as _output_path

    return _output_path(*args, **kwargs)


def evaluate(
    target: str,
    *,
    policy: str | None = None,
    guided: str | None = None,
    settings: EvalSettings | None = None,
    progress: Any = None,
) -> dict[str, Any]:
    """Evaluate RUN_DIR|MODEL and return the ``eval.json`` content (nothing is written).

    Args:
        target: a finished run directory, or a model spec (hub id, local folder,
            ``bundled:...``, ``tiny-random``).
        policy: the policy whose oracles score (default: the run's; ``toxicity`` for a model).
        guided: a finished run whose heads steer decoding (NADO decoding).
        settings: :class:`EvalSettings`.
        progress: an object with ``bar(job, total, unit)``, or None.
    """
    from attrctl.eval.runner import evaluate as _evaluate
    from attrctl.eval.runner import resolve_target as _resolve

    resolved = _resolve(target, policy=policy, guided=guided)
    return _evaluate(resolved, settings or EvalSettings(), progress=progress)


def run_eval(*args: Any, **kwargs: Any):
    """See :func:`attrctl.eval.runner.run_eval` (evaluate, then write ``eval.json``)."""
    from attrctl.eval.runner import run_eval as _run_eval

    return _run_eval(*args, **kwargs)


def summary_lines(result: dict[str, Any]) -> list[str]:
    """See :func:`attrctl.eval.summary.summary_lines`."""
    from attrctl.eval.summary import summary_lines as _summary_lines

    return _summary_lines(result)
