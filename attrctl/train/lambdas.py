"""``regularization.per_domain: auto`` — λ_d from how often each domain's training text violates.

The rule (documented in the schema and docs/training.md): score up to :data:`SAMPLE` examples of every
domain with every attribute's oracle; ``v_d`` is the share flagged by at least one attribute
(score ≥ its ``max_violation``). Then

    λ_d = lam + (auto_max − lam) · v_d / max_d v_d

so the domain that violates most gets ``auto_max``, a clean domain gets the global ``lam``, and
the rest scale linearly with their violation rate. If no domain violates, every λ_d is ``lam``.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np

SAMPLE = 2000  # examples scored per domain: a ±2% estimate of a 10% rate, a second or two of oracle


def auto_lambdas(ctx: Any) -> dict[str, Any]:
    reg = ctx.policy.regularization
    mixture = ctx.mixture()
    texts: dict[str, list[str]] = {}
    for src in mixture.sources:
        texts.setdefault(src.domain, []).extend(e.text for e in src.examples)
    rates = {}
    for d, pool in texts.items():
        rng = random.Random(f"auto-lambda/{ctx.policy.seed}/{d}")
        pick = pool if len(pool) <= SAMPLE else rng.sample(pool, SAMPLE)
        flagged = np.zeros(len(pick), dtype=bool)
        for a in ctx.compiled.attributes:
            flagged |= np.asarray(a.oracle.score(pick)) >= a.target.max_violation
        rates[d] = float(flagged.mean()) if len(pick) else 0.0
    top = max(rates.values(), default=0.0)
    lams = {d: reg.lam + (reg.auto_max - reg.lam) * (v / top if top > 0 else 0.0)
            for d, v in rates.items()}  # fmt: skip
    return {"lam_by_domain": lams, "violation_rate_by_domain": rates, "rule": "auto"}
