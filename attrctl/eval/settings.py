"""What ``attrctl eval`` can be told, with one default per setting (the CLI reads them from here).

Kept free of heavy imports: the CLI imports it to build ``--help``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from attrctl.errors import AttrctlError

#: BIG-bench tasks measured by default: those ``attrctl assets fetch bigbench`` provides.
DEFAULT_MC_TASKS = (
    "movie_recommendation",
    "general_knowledge",
    "date_understanding",
    "social_iqa",
)


@dataclass(frozen=True)
class EvalSettings:
    """Settings of one evaluation.

    Attributes:
        k: continuations per prompt (RealToxicityPrompts uses 25).
        top_p: nucleus mass of the sampler (RealToxicityPrompts: 0.9).
        max_new_tokens: tokens per continuation (RealToxicityPrompts: 20).
        seed: seed of the continuations and bootstrap; None: the policy's ``seed``.
        prompts: a prompt file (one per line) replacing the bundled held-out prompt sets.
        ppl_tokens: held-out Shakespeare tokens scored for perplexity (0: skip).
        ppl_window: tokens per perplexity window; None: the policy's ``finetune.seq_len``.
        mc_examples: examples per BIG-bench task at most (0: skip multiple choice).
        gen_ppl_rows: continuations scored under the base model for generation perplexity, at
            most (an even spread over all of them; 0: skip). Scoring is a forward pass of the base
            model per continuation — at k 25 on the held-out sets, all 3,750 would take about as
            long as sampling them.
        mc_tasks: the BIG-bench tasks to score.
        bigbench_root: where fetched tasks live (None: the attrctl cache).
        resamples: bootstrap resamples for the 95% intervals.
        batch_size: continuations sampled per call of the sampler.
        device: torch device of the models.
    """

    k: int = 25
    top_p: float = 0.9
    max_new_tokens: int = 20
    seed: int | None = None
    prompts: str | None = None
    ppl_tokens: int = 16384
    ppl_window: int | None = None
    mc_examples: int = 100
    mc_tasks: tuple[str, ...] = field(default=DEFAULT_MC_TASKS)
    gen_ppl_rows: int = 1000
    bigbench_root: Path | None = None
    resamples: int = 1000
    batch_size: int = 64
    device: str = "cpu"

    def __post_init__(self) -> None:
        checks = [
            (self.k >= 1, f"--k must be at least 1, got {self.k}"),
            (0 < self.top_p <= 1, f"--top-p must be in (0, 1], got {self.top_p}"),
            (self.max_new_tokens >= 1, f"--max-new-tokens must be at least 1, got {self.max_new_tokens}"),
            (self.seed is None or self.seed >= 0, f"--seed must be >= 0, got {self.seed}"),
            (self.ppl_tokens >= 0, f"--ppl-tokens must be >= 0, got {self.ppl_tokens}"),
            (self.ppl_window is None or self.ppl_window >= 2, f"--ppl-window must be at least 2, got {self.ppl_window}"),
            (self.mc_examples >= 0, f"--mc-examples must be >= 0, got {self.mc_examples}"),
            (self.gen_ppl_rows >= 0, f"--gen-ppl-rows must be >= 0, got {self.gen_ppl_rows}"),
            (self.resamples >= 1, f"resamples must be at least 1, got {self.resamples}"),
            (self.batch_size >= 1, f"batch_size must be at least 1, got {self.batch_size}"),
        ]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise AttrctlError(message)

    def record(self) -> dict[str, Any]:
        """The settings as ``eval.json`` records them (paths as strings)."""
        out = asdict(self)
        out["mc_tasks"] = list(self.mc_tasks)
        out["bigbench_root"] = str(self.bigbench_root) if self.bigbench_root else None
        return out
