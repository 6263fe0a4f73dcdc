"""The readable table ``attrctl eval`` prints from an ``eval.json`` result."""

from __future__ import annotations

from typing import Any

from attrctl.eval.metrics import STATS

_HEADERS = {"expected_max": "exp. max", "probability": "probability", "mean": "mean",
            "fraction": "fraction ≥ t"}  # fmt: skip


def _cell(m: dict[str, Any], stat: str) -> str:
    lo, hi = m[stat]["ci"]
    return f"{m[stat]['value']:.3f} [{lo:.3f}, {hi:.3f}]"


def control_rows(result: dict[str, Any]) -> list[list[str]]:
    """One row per (prompt set, attribute, scorer)."""
    rows = []
    for set_name, attrs in result["control"].items():
        for attr, scorers in attrs.items():
            for scorer in ("oracle", "judge"):
                m = scorers.get(scorer)
                if m is None:
                    continue
                rows.append([set_name, attr, scorer, *(_cell(m, s) for s in STATS),
                             f"{m['prompts']}×{m['samples'] // max(m['prompts'], 1)}"])  # fmt: skip
    return rows


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [
        fmt.format(*r) for r in rows
    ]


def summary_lines(result: dict[str, Any]) -> list[str]:
    """The result as lines of text: control table, utility, generation quality, times, notes."""
    s = result["settings"]
    lines = [
        f"{result['label']}  (method {result['method']}, policy {result['policy']})",
        f"attribute control: k={s['k']} continuations of {s['max_new_tokens']} tokens, "
        f"top-p {s['top_p']}, seed {s['seed']}; 95% bootstrap interval over prompts",
    ]
    header = ["prompts", "attribute", "scorer", *(_HEADERS[x] for x in STATS), "prompts×k"]
    lines += _table(header, control_rows(result))
    util = result["utility"]
    ppl = util.get("heldout_ppl")
    if ppl and ppl.get("value") is not None:
        lines.append(
            f"held-out Shakespeare perplexity  {ppl['value']:.2f}  "
            f"({ppl['tokens']} tokens, windows of {ppl['window']})"
        )
    mc = util.get("mc")
    if mc:
        tasks = ", ".join(
            f"{n} {t['accuracy']:.3f}±{t['stderr']:.3f} (chance {t['chance']:.2f}, n={t['n']})"
            for n, t in mc["tasks"].items()
        )
        lines.append(
            f"multiple choice (zero-shot)      {mc['accuracy']:.3f} ± {mc['stderr']:.3f}  "
            f"(chance {mc['chance']:.3f}): {tasks}"
        )
    for source, c in (result.get("classification") or {}).items():
        roc = c["roc_auc"]
        if roc["value"] is None:
            value = "n/a (the held-out rows have one label only)"
        elif roc["ci"][0] is None:
            value = f"{roc['value']:.3f}"
        else:
            value = f"{roc['value']:.3f} ({roc['ci'][0]:.3f}–{roc['ci'][1]:.3f})"
        lines.append(
            f"classification ROC-AUC           {value} on {c['texts']} held-out rows of {source} "
            f"({c['positives']} labelled {c['positive_label']!r}, {c['groups']} groups)"
        )
    gen = result["generation"]
    gppl = "n/a" if gen["ppl"] is None else f"{gen['ppl']:.2f}"
    d = gen["distinct"]
    lines.append(
        f"generations: perplexity {gppl} under {gen['base_model']}"
        f"{f' ({n} continuations)' if (n := gen.get('rows')) is not None else ''}; "
        f"distinct-1/2/3 {d['1']:.3f} / {d['2']:.3f} / {d['3']:.3f}"
    )
    train = result.get("train_seconds")
    timing = f"eval {result['eval_seconds'] / 60:.1f} min"
    if train is not None:
        timing += f", training {train / 60:.1f} min"
    lines.append(timing)
    lines += [f"note: {n}" for n in result.get("notes", [])]
    return lines
