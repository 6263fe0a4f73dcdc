"""``attrctl report``: eval results side by side, as the paper's table and a trade-off plot.

Reads the JSON files ``attrctl eval`` writes (a run directory stands for every ``eval*.json`` in
it) and renders one Markdown table — one row per result: violation rate by the training oracle
and by the independent judge with its confidence interval, expected maximum score, held-out
perplexity, multiple-choice accuracy, generation perplexity and diversity, training time —, a
second table of held-out control in detail (the judge's share, mean, expected maximum and
probability of any violation with intervals, the everyday prompts' share, perplexity), and a
PNG of judge-scored violation against held-out perplexity, one labelled point per result, so a
λ sweep draws the control/utility front. Every field may be missing (no judge, no MC tasks, an
older file): its cell shows "–". The schema read (all optional but ``control``'s shape)::

    {"label", "method", "policy", "control": {SET: {ATTRIBUTE: {"oracle": M, "judge": M}}},
     "utility": {"heldout_ppl": {"value"}, "mc": {"accuracy", "stderr", "chance"}},
     "generation": {"ppl", "distinct": {"1", "2", "3"}}, "train_seconds"}
    M = {"fraction": {"value", "ci": [lo, hi]}, "expected_max": {...}, "probability": {...}, ...}
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attrctl.errors import AttrctlError
from attrctl.paths import atomic_write

DASH = "–"


@dataclass(frozen=True)
class EvalFile:
    """One eval result as read from disk."""

    path: Path
    data: dict[str, Any]


@dataclass(frozen=True)
class Stat:
    """A number with an optional confidence interval; ``value`` None when missing."""

    value: float | None
    lo: float | None = None
    hi: float | None = None


@dataclass(frozen=True)
class Row:
    """What one table row and one plot point show (None: missing)."""

    label: str
    method: str | None
    source: Path
    oracle_violation: Stat
    oracle_exp_max: Stat
    judge_violation: Stat
    judge_exp_max: Stat
    judge_mean: Stat
    judge_probability: Stat
    neutral_judge_violation: Stat
    heldout_ppl: float | None
    mc_accuracy: float | None
    mc_stderr: float | None
    mc_chance: float | None
    gen_ppl: float | None
    distinct: tuple[float | None, float | None, float | None]
    train_seconds: float | None
    roc_auc: Stat = Stat(None, None, None)  # classification, on a templated source's test rows


@dataclass(frozen=True)
class Report:
    """The rendered table and, when written, where."""

    markdown: str
    rows: list[Row]
    prompt_set: str
    attribute: str | None
    control: str = ""  # the held-out control table in detail (:func:`control_table`)
    markdown_path: Path | None = None
    plot_path: Path | None = None


# ------------------------------------------------------------------------------ reading
def eval_files(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """The JSON files behind ``paths``: a folder gives its ``eval*.json`` (sorted), a file itself.

    Raises:
        AttrctlError: nothing given, a path that does not exist, a folder without eval files.
    """
    if not paths:
        raise AttrctlError("report: give at least one eval JSON file or run directory")
    files: list[Path] = []
    for p in map(Path, paths):
        p = p.expanduser()
        if p.is_dir():
            found = sorted(f for f in p.glob("eval*.json") if f.is_file())
            if not found:
                raise AttrctlError(
                    f"{p}: no eval*.json in this folder (write one with `attrctl eval {p}`)"
                )
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise AttrctlError(f"{p}: no such file or directory")
    return files


RESULT_SECTIONS = ("control", "utility", "generation")


def read_eval(path: Path) -> EvalFile:
    """One eval JSON file.

    Raises:
        AttrctlError: unreadable, not JSON, not a JSON object, or an object with none of the
            result sections (the message names the file).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise AttrctlError(f"{path}: cannot read the eval result ({err})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise AttrctlError(
            f"{path}: not valid JSON ({err}); is it an `attrctl eval` result?"
        ) from None
    if not isinstance(data, dict):
        raise AttrctlError(
            f"{path}: expected a JSON object (an `attrctl eval` result), got {type(data).__name__}"
        )
    if not any(k in data for k in RESULT_SECTIONS):
        raise AttrctlError(
            f"{path}: holds none of the sections of an `attrctl eval` result "
            f"({', '.join(RESULT_SECTIONS)})"
        )
    if "control" in data and not isinstance(data["control"], (dict, type(None))):
        raise AttrctlError(f"{path}: field 'control' should be an object of prompt sets")
    return EvalFile(path, data)


# ------------------------------------------------------------------------------ rows
def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _num(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(x) else None


def _stat(m: Any) -> Stat:
    ci = _get(m, "ci")
    lo, hi = (_num(ci[0]), _num(ci[1])) if isinstance(ci, list) and len(ci) == 2 else (None, None)
    return Stat(_num(_get(m, "value")), lo, hi)


def pick_prompt_set(files: Sequence[EvalFile], requested: str | None = None) -> str:
    """The prompt set the violation columns show: ``requested``, else the toxic-leaning held-out
    set (a name with "toxic", preferring one that also says held-out/test), else ``all``."""
    if requested:
        return requested
    names: list[str] = []
    for f in files:
        control = f.data.get("control")
        for name in control if isinstance(control, dict) else ():
            if name not in names:
                names.append(name)
    toxic = [n for n in names if "toxic" in n.lower()]
    held = [n for n in toxic if any(w in n.lower() for w in ("held", "test", "eval"))]
    return (held or toxic or ["all"])[0]


def pick_attribute(
    files: Sequence[EvalFile], prompt_set: str, requested: str | None = None
) -> str | None:
    """The attribute the violation columns show: ``requested``, else ``toxicity`` if scored,
    else the first one found."""
    if requested:
        return requested
    names: list[str] = []
    for f in files:
        scored = _get(f.data, "control", prompt_set)
        for name in scored if isinstance(scored, dict) else ():
            if name not in names:
                names.append(name)
    return "toxicity" if "toxicity" in names else (names[0] if names else None)


def neutral_set(f: EvalFile, prompt_set: str) -> str | None:
    """The file's everyday-prompt set beside ``prompt_set`` (a name with "neutral"), if any."""
    control = f.data.get("control")
    names = [n for n in control if "neutral" in n.lower()] if isinstance(control, dict) else []
    return next((n for n in names if n != prompt_set), None)


def to_row(f: EvalFile, prompt_set: str, attribute: str | None) -> Row:
    d = f.data
    scored = _get(d, "control", prompt_set, attribute) if attribute else None
    neutral = neutral_set(f, prompt_set)
    neutral_scored = _get(d, "control", neutral, attribute) if attribute and neutral else None
    distinct = _get(d, "generation", "distinct")
    label = d.get("label")
    method = d.get("method")
    return Row(
        label=label if isinstance(label, str) and label else f.path.stem,
        method=method if isinstance(method, str) and method else None,
        source=f.path,
        oracle_violation=_stat(_get(scored, "oracle", "fraction")),
        oracle_exp_max=_stat(_get(scored, "oracle", "expected_max")),
        judge_violation=_stat(_get(scored, "judge", "fraction")),
        judge_exp_max=_stat(_get(scored, "judge", "expected_max")),
        judge_mean=_stat(_get(scored, "judge", "mean")),
        judge_probability=_stat(_get(scored, "judge", "probability")),
        neutral_judge_violation=_stat(_get(neutral_scored, "judge", "fraction")),
        heldout_ppl=_num(_get(d, "utility", "heldout_ppl", "value")),
        mc_accuracy=_num(_get(d, "utility", "mc", "accuracy")),
        mc_stderr=_num(_get(d, "utility", "mc", "stderr")),
        mc_chance=_num(_get(d, "utility", "mc", "chance")),
        gen_ppl=_num(_get(d, "generation", "ppl")),
        distinct=tuple(_num(_get(distinct, k)) for k in ("1", "2", "3")),  # type: ignore[arg-type]
        train_seconds=_num(d.get("train_seconds")),
        roc_auc=_roc_auc(d),
    )


def _roc_auc(d: dict) -> Stat:
    """The classification ROC-AUC of an eval result (its first templated source), if any."""
    cls = d.get("classification")
    first = next(iter(cls.values()), None) if isinstance(cls, dict) and cls else None
    return _stat(_get(first, "roc_auc"))


# ------------------------------------------------------------------------------ rendering
def _pct(s: Stat) -> str:
    if s.value is None:
        return DASH
    ci = f" ({100 * s.lo:.1f}–{100 * s.hi:.1f})" if s.lo is not None and s.hi is not None else ""
    return f"{100 * s.value:.1f}%{ci}"


def _fix(x: float | None, digits: int = 2) -> str:
    return DASH if x is None else f"{x:.{digits}f}"


def _duration(s: float | None) -> str:
    if s is None:
        return DASH
    if s < 120:
        return f"{s:.0f} s"
    return f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def markdown_table(rows: Sequence[Row], prompt_set: str, attribute: str | None) -> str:
    """The paper-shaped table, with a line that says what the columns measure."""
    chances = {r.mc_chance for r in rows if r.mc_accuracy is not None}
    one_chance = len(chances) == 1 and None not in chances
    mc_head = f"MC acc. (chance {next(iter(chances)):.2f})" if one_chance else "MC acc."
    head = ["run", "method", "violation, oracle", "exp. max, oracle", "violation, judge",
            "exp. max, judge", "held-out ppl", mc_head, "gen. ppl", "distinct-1/2/3",
            "train time"]  # fmt: skip
    body = []
    for r in rows:
        if r.mc_accuracy is None:
            mc = DASH
        else:
            mc = f"{r.mc_accuracy:.3f}" + (
                f" ± {r.mc_stderr:.3f}" if r.mc_stderr is not None else ""
            )
            if not one_chance and r.mc_chance is not None:
                mc += f" (chance {r.mc_chance:.2f})"
        distinct = DASH if all(x is None for x in r.distinct) else " / ".join(map(_fix, r.distinct))
        cells = [
            r.label.replace("|", "\\|"), r.method or DASH,
            _pct(r.oracle_violation), _fix(r.oracle_exp_max.value),
            _pct(r.judge_violation), _fix(r.judge_exp_max.value),
            _fix(r.heldout_ppl, 1), mc, _fix(r.gen_ppl, 1), distinct, _duration(r.train_seconds),
        ]  # fmt: skip
        body.append(cells)
    what = f"attribute `{attribute}`" if attribute else "no attribute scored"
    note = (
        f"Violation: share of continuations scoring ≥ 0.5 on prompt set `{prompt_set}`, {what}, "
        "with its confidence interval in parentheses; exp. max: mean over prompts of the highest "
        "score among the prompt's continuations. Oracle: the classifier training used; judge: an "
        "independent classifier training never saw. Both catch explicit toxicity and miss "
        f"implicit hate. {DASH}: not measured."
    )
    return _table(head, body, note)


def _table(head: Sequence[str], body: Sequence[Sequence[str]], note: str) -> str:
    """A Markdown table (header, rule, one line per row of cells) and the note under it."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join([*lines, "", note])


def _ci(s: Stat, digits: int = 3) -> str:
    if s.value is None:
        return DASH
    ci = f" ({s.lo:.{digits}f}–{s.hi:.{digits}f})" if s.lo is not None and s.hi is not None else ""
    return f"{s.value:.{digits}f}{ci}"


def control_table(rows: Sequence[Row], prompt_set: str, attribute: str | None) -> str:
    """Held-out control in detail, by the judge: the RealToxicityPrompts measures — share ≥ 0.5,
    mean score, expected maximum and probability of at least one violation among a prompt's
    continuations, each with its interval — the everyday prompts' share, held-out perplexity and
    training time."""
    roc = any(r.roc_auc.value is not None for r in rows)
    head = ["run", *(["ROC-AUC"] if roc else []), "share ≥ 0.5", "mean", "expected max",
            "P(any ≥ 0.5)", "neutral share", "held-out ppl", "train time"]  # fmt: skip
    body = [
        [r.label.replace("|", "\\|"), *([_ci(r.roc_auc)] if roc else []),
         _ci(r.judge_violation), _ci(r.judge_mean), _ci(r.judge_exp_max),
         _ci(r.judge_probability), _ci(r.neutral_judge_violation), _fix(r.heldout_ppl, 2),
         _duration(r.train_seconds)]
        for r in rows
    ]  # fmt: skip
    what = f"attribute `{attribute}`" if attribute else "no attribute scored"
    note = (
        f"Judge scores on prompt set `{prompt_set}`, {what}, with 95% bootstrap intervals over "
        "prompts: the share of continuations scoring ≥ 0.5, their mean score, the expected "
        "maximum (mean over prompts of the highest score among a prompt's continuations) and the "
        "probability that at least one of a prompt's continuations scores ≥ 0.5; neutral share: "
        f"the share ≥ 0.5 on the everyday prompts. {DASH}: not measured."
    )
    if roc:
        note += (
            " ROC-AUC: classification of the held-out rows of the policy's (first) templated source, "
            "scored by the log-odds of the positive label's words, with a 95% bootstrap interval "
            "over the split's groups."
        )
    return _table(head, body, note)


LABEL_POINTS = 8  # font size of point labels
#: Where a point's label may go, in points from the point, tried in order: right above, right
#: below, further up and down, then the same on the left ("L": offset by the label's width).
_LABEL_SLOTS = ((5, 4), (5, -11), (5, 15), (5, -22), ("L", 4), ("L", -11), (5, 26), (5, -33))


def _place_labels(fig, ax, points: Sequence[tuple[str, float, float, str]]) -> None:
    """Label each ``(label, x, y, colour)``, in its point's colour, at the first slot where its box overlaps no label placed
    before it (boxes estimated from the label's length at :data:`LABEL_POINTS`)."""
    fig.canvas.draw()  # the axis limits settle, so data → display is final up to layout
    scale = fig.dpi / 72  # display pixels per point
    placed: list[tuple[float, float, float, float]] = []
    for label, x, y, color in points:
        px, py = ax.transData.transform((x, y))
        w, h = 0.6 * LABEL_POINTS * len(label), LABEL_POINTS + 2  # in points
        for dx, dy in _LABEL_SLOTS:
            dx = -5 - w if dx == "L" else dx
            box = (px + dx * scale, py + dy * scale, px + (dx + w) * scale, py + (dy + h) * scale)
            free = all(
                box[2] <= b[0] or b[2] <= box[0] or box[3] <= b[1] or b[3] <= box[1] for b in placed
            )
            if free:
                break
        placed.append(box)
        moved = (dx, dy) != _LABEL_SLOTS[0]  # a label away from its point gets a leader line
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(dx, dy),
                    fontsize=LABEL_POINTS, color=color,
                    arrowprops={"arrowstyle": "-", "lw": 0.6, "color": color} if moved else None)  # fmt: skip


def plot_tradeoff(rows: Sequence[Row], path: Path, prompt_set: str) -> None:
    """Judge-scored violation (with its CI) against held-out perplexity, one labelled point per
    row, the lower-left front dashed. Rows without either number are listed, not drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def drawable(r: Row) -> bool:
        return r.judge_violation.value is not None and r.heldout_ppl is not None

    pts = [r for r in rows if drawable(r)]
    skipped = [r.label for r in rows if not drawable(r)]
    fig, ax = plt.subplots(figsize=(7, 5))
    colors: list[str] = []
    for r in pts:
        v = r.judge_violation
        lo = v.value - v.lo if v.lo is not None else 0.0
        hi = v.hi - v.value if v.hi is not None else 0.0
        bars = ax.errorbar([r.heldout_ppl], [100 * v.value],
                           yerr=[[100 * max(lo, 0)], [100 * max(hi, 0)]], fmt="o", capsize=3)  # fmt: skip
        colors.append(bars.lines[0].get_color())
    _place_labels(fig, ax, [(r.label, r.heldout_ppl, 100 * r.judge_violation.value, c)
                            for r, c in zip(pts, colors, strict=True)])  # fmt: skip
    front, best = [], math.inf
    for r in sorted(pts, key=lambda r: (r.heldout_ppl, r.judge_violation.value)):
        if r.judge_violation.value < best:
            best = r.judge_violation.value
            front.append(r)
    if len(front) > 1:
        ax.plot([r.heldout_ppl for r in front], [100 * r.judge_violation.value for r in front],
                "--", color="grey", lw=0.8, label="front (lower is better on both)")  # fmt: skip
        ax.legend(fontsize=8)
    if not pts:
        ax.text(0.5, 0.5, "no result has both a judge score and a held-out perplexity",
                ha="center", va="center", transform=ax.transAxes)  # fmt: skip
    ax.set(xlabel="held-out perplexity (lower is better)",
           ylabel=f"violation by the judge, % (prompt set {prompt_set})",
           title="control vs utility")  # fmt: skip
    if skipped:
        fig.text(0.01, 0.01, "not drawn (no judge score or perplexity): " + ", ".join(skipped),
                 fontsize=7)  # fmt: skip
    fig.tight_layout()
    with atomic_write(path, "wb", encoding=None) as fh:
        fig.savefig(fh, format="png", dpi=110)
    plt.close(fig)


def build_report(
    paths: Sequence[str | os.PathLike],
    out: str | os.PathLike | None = None,
    *,
    prompt_set: str | None = None,
    attribute: str | None = None,
) -> Report:
    """Read eval results, render the table and, with ``out``, write ``report.md`` and
    ``tradeoff.png`` there.

    Args:
        paths: eval JSON files or run directories (each gives its ``eval*.json``).
        out: a folder to write into (created), or None to only render.
        prompt_set: which prompt set the violation columns show (default: the toxic-leaning one).
        attribute: which attribute (default ``toxicity``, or the first scored).

    Raises:
        AttrctlError: a missing path, a folder without eval files, a malformed JSON file.
    """
    files = [read_eval(p) for p in eval_files(paths)]
    pset = pick_prompt_set(files, prompt_set)
    attr = pick_attribute(files, pset, attribute)
    rows = [to_row(f, pset, attr) for f in files]
    table = markdown_table(rows, pset, attr)
    detail = control_table(rows, pset, attr)
    if out is None:
        return Report(table, rows, pset, attr, detail)
    folder = Path(out).expanduser()
    if folder.exists() and not folder.is_dir():
        raise AttrctlError(f"{folder}: --out must be a folder; this is a file")
    md, png = folder / "report.md", folder / "tradeoff.png"
    sources = "\n".join(f"- {r.label}: `{r.source}`" for r in rows)
    with atomic_write(md) as fh:
        fh.write(
            f"# attrctl report\n\n{table}\n\n![trade-off](tradeoff.png)\n\n"
            f"## Held-out control in detail\n\n{detail}\n\nSources:\n\n{sources}\n"
        )
    plot_tradeoff(rows, png, pset)
    return Report(table, rows, pset, attr, detail, md, png)
