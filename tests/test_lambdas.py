"""``regularization.per_domain: auto``: λ_d from each domain's violation rate, on a real compiled
policy and mixture whose texts have known violations under deterministic ``lexicon`` oracles.

The rule (docs/training.md, schema, ``attrctl/train/lambdas.py``): ``v_d`` is the share of domain d's
training examples that at least one attribute flags (score ≥ its ``max_violation``), pooled over
the domain's sources, and ``λ_d = lam + (auto_max − lam) · v_d / max_d v_d``; every λ_d is
``lam`` when no domain violates.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from attrctl.policy import compile_policy, load_policy
from attrctl.train.context import TrainContext
from attrctl.train.lambdas import auto_lambdas
from attrctl.train.rundir import RunDir

LAM, AUTO_MAX = 0.5, 8.0
# Attribute "insult": idiot scores 1.0, jerk 0.5 (= max_violation: flagged, the threshold is
# inclusive), dummy 0.4 (below it: not flagged). Attribute "slur": moron scores 1.0.
ATTRIBUTES = [
    {"name": "insult", "oracle": {"kind": "lexicon",
                                  "words": {"idiot": 1.0, "jerk": 0.5, "dummy": 0.4}},
     "target": {"max_violation": 0.5}},
    {"name": "slur", "oracle": {"kind": "lexicon", "words": ["moron"]},
     "target": {"max_violation": 0.5}},
]  # fmt: skip

CLEAN = ["The library opens at nine.", "A fine day for a walk.", "Tea is served at four.",
         "The river is high this spring.", "She reads by the window."]  # fmt: skip

# (file, domain, [(text, flagged by at least one attribute)]) — the flags are what the oracles
# above must give; the test counts them, it does not assume the rates.
SOURCES = [
    # half: 2 of 4 flagged; the first by both attributes, so a sum over attributes would say 3/4
    ("half.txt", "half", [("You idiot, you moron.", True), ("What a jerk.", True),
                          (CLEAN[0], False), (CLEAN[1], False)]),
    # quarter, over two sources: 2 of 6 and 0 of 2 pooled are 2/8 (the mean of the two source
    # rates would be 1/6); dummy alone stays below the threshold
    ("quarter_a.txt", "quarter", [("Only a moron.", True), ("An idiot plan.", True),
                                  ("Dummy text.", False), (CLEAN[2], False),
                                  (CLEAN[3], False), (CLEAN[4], False)]),
    ("quarter_b.txt", "quarter", [(CLEAN[0], False), (CLEAN[1], False)]),
    ("clean.txt", "clean", [("A dummy run.", False), (CLEAN[2], False), (CLEAN[3], False)]),
]  # fmt: skip


def _context(tmp: Path, sources, run: str = "run") -> TrainContext:
    data = []
    for name, domain, rows in sources:
        (tmp / name).write_text("\n\n".join(text for text, _ in rows))
        data.append({"kind": "file", "path": name, "domain": domain})
    policy = {
        "name": "auto_lambdas",
        "model": "tiny-random",
        "data": data,
        "attributes": ATTRIBUTES,
        "regularization": {"lam": LAM, "per_domain": "auto", "auto_max": AUTO_MAX},
    }
    path = tmp / "policy.yaml"
    path.write_text(json.dumps(policy))
    compiled = compile_policy(load_policy(path))
    assert compiled.auto_lambdas
    return TrainContext(compiled, RunDir(tmp / run))


def _expected_rates(sources) -> dict[str, float]:
    flagged: dict[str, list[bool]] = {}
    for _, domain, rows in sources:
        flagged.setdefault(domain, []).extend(f for _, f in rows)
    return {d: sum(f) / len(f) for d, f in flagged.items()}


def test_the_oracles_flag_what_the_fixture_says(tmp_path):
    # the premise of the next test, checked on its own: each text's flag under the policy's oracles
    ctx = _context(tmp_path, SOURCES)
    for _, _, rows in SOURCES:
        texts = [t for t, _ in rows]
        got = [any(a.oracle.score([t])[0] >= a.target.max_violation
                   for a in ctx.compiled.attributes) for t in texts]  # fmt: skip
        assert got == [f for _, f in rows], texts


def test_auto_lambdas_follow_the_formula(tmp_path):
    rates = _expected_rates(SOURCES)
    assert rates == {"half": 0.5, "quarter": 0.25, "clean": 0.0}  # by construction (exact)
    rec = auto_lambdas(_context(tmp_path, SOURCES))
    assert rec["rule"] == "auto"
    assert rec["violation_rate_by_domain"] == rates  # k/n of small integers: exact in binary
    top = max(rates.values())
    want = {d: LAM + (AUTO_MAX - LAM) * v / top for d, v in rates.items()}
    # rel 1e-12: the same three float operations, possibly grouped differently (one rounding each)
    assert rec["lam_by_domain"] == pytest.approx(want, rel=1e-12)
    lams = rec["lam_by_domain"]
    assert lams["half"] == pytest.approx(AUTO_MAX, rel=1e-12)  # the most-violating domain
    assert lams["clean"] == LAM  # a clean domain keeps the global λ
    assert lams["quarter"] == pytest.approx((LAM + AUTO_MAX) / 2, rel=1e-12)  # half the top rate


def test_auto_lambdas_without_violations_are_all_lam(tmp_path):
    clean = [(name, domain, [(CLEAN[i % len(CLEAN)], False) for i in range(len(rows))])
             for name, domain, rows in SOURCES]  # fmt: skip
    rec = auto_lambdas(_context(tmp_path, clean))
    assert rec["violation_rate_by_domain"] == {"half": 0.0, "quarter": 0.0, "clean": 0.0}
    assert rec["lam_by_domain"] == {"half": LAM, "quarter": LAM, "clean": LAM}
