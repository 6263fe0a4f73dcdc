"""`attrctl report` on hand-written eval results: the table, the plot, missing fields, bad input.

No model is loaded: the fixtures follow the schema `attrctl eval` writes (attrctl/eval/__init__.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from attrctl.errors import AttrctlError
from attrctl.report import build_report


def _m(fraction: float, lo: float, hi: float, exp_max: float) -> dict:
    return {
        "expected_max": {"value": exp_max, "ci": [exp_max - 0.05, exp_max + 0.05]},
        "probability": {"value": min(1.0, 3 * fraction), "ci": [0.0, 1.0]},
        "mean": {"value": fraction / 2, "ci": [0.0, 1.0]},
        "fraction": {"value": fraction, "ci": [lo, hi]},
        "prompts": 100,
        "samples": 2500,
    }


def full_result(label: str, method: str, judge: float, ppl: float) -> dict:
    judged = _m(judge, judge - 0.02, judge + 0.03, 0.55)
    block = {"toxicity": {"oracle": _m(0.10, 0.08, 0.12, 0.61), "judge": judged}}
    return {
        "label": label,
        "method": method,
        "target": f"runs/{label}",
        "guided": None,
        "policy": "toxicity",
        "settings": {"k": 25},
        "control": {"heldout_toxic": block, "heldout_neutral": block, "all": block},
        "utility": {
            "heldout_ppl": {"value": ppl, "tokens": 20000},
            "mc": {
                "tasks": {
                    "social_iqa": {"accuracy": 0.4, "stderr": 0.02, "chance": 0.33, "n": 200}
                },
                "accuracy": 0.412,
                "stderr": 0.0123,
                "chance": 0.25,
            },
        },
        "generation": {"ppl": 23.45, "distinct": {"1": 0.5, "2": 0.8, "3": 0.9}},
        "train_seconds": 1440.0,
        "eval_seconds": 300.0,
    }


def _write(folder: Path, name: str, data) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def _cells(markdown: str) -> list[list[str]]:
    rows = [line for line in markdown.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in rows]


def test_table_rows_columns_and_values(tmp_path):
    base = _write(tmp_path / "base", "eval.json", full_result("base", "base", 0.12, 51.1))
    run = tmp_path / "ours"  # a run directory: every eval*.json in it, sorted
    _write(run, "eval.json", full_result("ours λ10", "regularized", 0.05, 40.5))
    _write(run, "eval_guided.json", full_result("ours (guided)", "nado_decoding", 0.04, 40.5))
    _write(run, "state.json", {"jobs": {}})  # not an eval file: ignored
    rep = build_report([base, run])
    table = _cells(rep.markdown)
    head, rows = table[0], table[2:]
    assert head[:2] == ["run", "method"] and "MC acc. (chance 0.25)" in head
    assert [r[0] for r in rows] == ["base", "ours λ10", "ours (guided)"]
    assert rep.prompt_set == "heldout_toxic" and rep.attribute == "toxicity"
    col = dict(zip(head, rows[1], strict=True))
    assert col["violation, oracle"] == "10.0% (8.0–12.0)"
    assert col["violation, judge"] == "5.0% (3.0–8.0)"
    assert col["exp. max, oracle"] == "0.61" and col["exp. max, judge"] == "0.55"
    assert col["held-out ppl"] == "40.5" and col["gen. ppl"] == "23.4"
    assert col["MC acc. (chance 0.25)"] == "0.412 ± 0.012"
    assert col["distinct-1/2/3"] == "0.50 / 0.80 / 0.90"
    assert col["train time"] == "24.0 min" and col["method"] == "regularized"
    assert "heldout_toxic" in rep.markdown  # the note says which prompt set the columns show


def test_writes_report_and_png(tmp_path, run_cli):
    paths = [
        _write(tmp_path, f"eval_lam{lam}.json", full_result(f"λ {lam}", "regularized", v, p))
        for lam, v, p in [(1, 0.20, 39.9), (10, 0.08, 40.5), (30, 0.05, 42.4)]
    ]
    out = tmp_path / "report"
    code, stdout, err = run_cli("report", *paths, "--out", out)
    assert code == 0, err
    assert "| λ 10 |" in stdout and str(out / "report.md") in stdout
    md = (out / "report.md").read_text()
    assert "| λ 30 |" in md and "tradeoff.png" in md
    png = (out / "tradeoff.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_missing_optional_fields_show_a_dash(tmp_path):
    scored = {"toxicity": {"oracle": _m(0.1, 0.05, 0.15, 0.6), "judge": None}}
    minimal = {"label": "bare", "control": {"all": scored},
               "utility": {"heldout_ppl": None, "mc": None}, "train_seconds": None}  # fmt: skip
    odd = {"method": "sft", "generation": {"ppl": "n/a", "distinct": {"2": 0.7}}}  # no label
    rep = build_report(
        [_write(tmp_path, "eval_a.json", minimal), _write(tmp_path, "eval_b.json", odd)],
        out=tmp_path / "out",
    )
    rows = _cells(rep.markdown)
    head = rows[0]
    a, b = (dict(zip(head, r, strict=True)) for r in rows[2:])
    assert rep.prompt_set == "all"  # no toxic-leaning set in these results
    assert a["violation, oracle"] == "10.0% (5.0–15.0)" and a["violation, judge"] == "–"
    assert a["held-out ppl"] == a["MC acc."] == a["train time"] == a["method"] == "–"
    assert b["run"] == "eval_b"  # no label: the file's name
    assert b["violation, oracle"] == "–" and b["gen. ppl"] == "–"
    assert b["distinct-1/2/3"] == "– / 0.70 / –"
    assert (tmp_path / "out" / "tradeoff.png").stat().st_size > 0  # nothing to draw: still a PNG


@pytest.mark.parametrize(
    ("content", "message"),
    [("{not json", "not valid JSON"), ("[1, 2]", "expected a JSON object"),
     ('{"control": [1]}', "'control'"), ("{}", "none of the sections"),
     ('{"label": "x", "settings": {}}', "none of the sections")],
)  # fmt: skip
def test_malformed_input_names_the_file(tmp_path, run_cli, content, message):
    good = _write(tmp_path, "eval_good.json", full_result("ok", "sft", 0.1, 40.0))
    bad = _write(tmp_path, "eval_bad.json", content)
    with pytest.raises(AttrctlError, match=message) as err:
        build_report([good, bad])
    assert str(bad) in str(err.value)
    code, _, stderr = run_cli("report", good, bad, "--out", tmp_path / "out")
    assert code == 2 and str(bad) in stderr and "Traceback" not in stderr
    assert not (tmp_path / "out").exists()  # nothing written


def test_paths_that_hold_nothing_are_errors(tmp_path):
    with pytest.raises(AttrctlError, match="no eval"):
        build_report([tmp_path])
    with pytest.raises(AttrctlError, match="no such file"):
        build_report([tmp_path / "missing.json"])


def test_control_table_shows_the_tail_and_the_everyday_prompts(tmp_path):
    def result(label, frac, mean, emax, prob, neutral):
        m = {"fraction": {"value": frac, "ci": [frac - 0.01, frac + 0.01]},
             "mean": {"value": mean, "ci": [mean - 0.02, mean + 0.02]},
             "expected_max": {"value": emax, "ci": [emax - 0.05, emax + 0.05]},
             "probability": {"value": prob, "ci": [prob - 0.1, prob + 0.1]}}  # fmt: skip
        n = {"fraction": {"value": neutral, "ci": [0.0, 2 * neutral]}}
        return {"label": label, "control": {"heldout_toxic": {"toxicity": {"judge": m}},
                                            "heldout_neutral": {"toxicity": {"judge": n}}},
                "utility": {"heldout_ppl": {"value": 40.123}}, "train_seconds": 1100}  # fmt: skip

    rep = build_report([_write(tmp_path, "eval_a.json", result("ours", 0.06, 0.12, 0.6, 0.55,
                                                                0.004))])  # fmt: skip
    cells = _cells(rep.control)
    row = dict(zip(cells[0], cells[2], strict=True))
    assert row["share ≥ 0.5"] == "0.060 (0.050–0.070)"
    assert row["mean"] == "0.120 (0.100–0.140)"
    assert row["expected max"] == "0.600 (0.550–0.650)"
    assert row["P(any ≥ 0.5)"] == "0.550 (0.450–0.650)"
    assert row["neutral share"] == "0.004 (0.000–0.008)"
    assert row["held-out ppl"] == "40.12" and row["train time"] == "18.3 min"
    assert "heldout_toxic" in rep.control
