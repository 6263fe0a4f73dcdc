"""The model's own continuations, for the fine-tune's KL-only term (``regularization.own_samples``).

The mixture's KL acts at the positions of the training text only; contexts the corpus lacks are
left alone. This term adds ``λ_own · KL(sg[q_t] ‖ p_t)`` at the positions where the model itself
goes now: continuations of the regularizer prompts sampled from the current weights. The heads'
gradient ``p_t − q_t`` is large exactly where the model still puts mass on tokens the heads
mark as violating, so the term follows the model's remaining violations from context to context,
the way on-policy RL does, without a reward model in the loop.

Row ``g`` of the stream (step ``s`` uses rows ``s·rows … (s+1)·rows − 1``) continues the prompt at
position ``g mod P`` of a seeded permutation of the ``P`` regularizer prompts (a fresh permutation
every ``P`` rows) with its own sampling seed, so a row does not depend on the batch, the rank or
when it is sampled. Every ``refresh_every`` steps the rows of the next ``refresh_every`` steps are
sampled at once from the weights of that moment; the batch is saved with each checkpoint, so a
resumed run regularizes on exactly the rows the uninterrupted one would have.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from attrctl.data.prompt_sets import load_prompt_set
from attrctl.errors import AttrctlError
from attrctl.losses import token_kl
from attrctl.sampling import prompt_token_ids, row_seed, sample_continuations
from attrctl.train.distributed import gather_rows

FILE = "own_samples.json"  # the batch in a fine-tune checkpoint folder
SAMPLE_BATCH = 64


@dataclass
class OwnBatch:
    """Sampled rows ``first … first + count − 1`` of the stream (this rank's share only).

    Attributes:
        first: the stream index of the first row of the refresh window.
        count: rows in the window (all ranks together).
        rows: ``{g: (ids, start)}``: prompt + continuation token ids and the index of the first
            continuation token, for every row of the window (each rank samples its share and
            the shares are gathered, so the checkpoint rank 0 writes holds every rank's rows).
    """

    first: int
    count: int
    rows: dict[int, tuple[list[int], int]]

    def covers(self, lo: int, hi: int) -> bool:
        return self.first <= lo and hi <= self.first + self.count

    def save(self, folder: Path) -> None:
        data = {"first": self.first, "count": self.count,
                "rows": {str(g): {"ids": ids, "start": start}
                         for g, (ids, start) in sorted(self.rows.items())}}  # fmt: skip
        (folder / FILE).write_text(json.dumps(data) + "\n")

    @classmethod
    def load(cls, folder: Path) -> OwnBatch | None:
        path = folder / FILE
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text())
            rows = {int(g): ([int(t) for t in r["ids"]], int(r["start"]))
                    for g, r in data["rows"].items()}  # fmt: skip
            return cls(int(data["first"]), int(data["count"]), rows)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise AttrctlError(
                f"{path}: the checkpoint's own-sample batch is corrupt ({err}); delete "
                f"{folder} to restart this iteration's fine-tune from its start"
            ) from None


class OwnSamples:
    """Draws and serves the own-continuation rows of one fine-tune job (iteration ``i``)."""

    def __init__(self, ctx: Any, i: int, tokenizer: Any):
        settings = ctx.policy.regularization.own_samples
        self.per_step, self.refresh = settings.rows, settings.refresh_every
        self.max_new = settings.max_new_tokens
        if self.per_step % ctx.world:
            raise AttrctlError(
                f"regularization.own_samples.rows {self.per_step} must be a multiple of the "
                f"number of ranks ({ctx.world})"
            )
        self.ctx, self.rank, self.world = ctx, ctx.rank, ctx.world
        self.seed, self.i = ctx.policy.seed, i
        self.tokenizer = tokenizer
        self.prompts = [
            (Path(ref).name, j, text)
            for ref in settings.prompts or ctx.policy.regularizer.prompts
            for j, text in enumerate(load_prompt_set(ref).prompts)
        ]
        self.batch: OwnBatch | None = None

    def _prompt(self, g: int) -> tuple[str, int, str]:
        n = len(self.prompts)
        epoch = g // n
        key = hashlib.sha256(f"{self.seed}/own/{self.i}/{epoch}".encode()).digest()
        order = list(range(n))
        random.Random(int.from_bytes(key[:8], "little")).shuffle(order)
        return self.prompts[order[g % n]]

    def rows_of_step(self, step: int) -> list[int]:
        """The stream indices this rank regularizes at ``step``."""
        lo = step * self.per_step
        return list(range(lo + self.rank, lo + self.per_step, self.world))

    def ensure(self, model: Any, step: int) -> None:
        """Sample the window of ``step`` from ``model`` unless the current batch covers it."""
        lo, hi = step * self.per_step, (step + 1) * self.per_step
        if self.batch is not None and self.batch.covers(lo, hi):
            return
        start = step - step % self.refresh  # where the uninterrupted run sampled this window
        first, count = start * self.per_step, self.refresh * self.per_step
        mine = list(range(first + self.rank, first + count, self.world))
        was_training = model.training
        model.eval()
        rows: dict[int, tuple[list[int], int]] = {}
        try:
            for b in range(0, len(mine), SAMPLE_BATCH):
                chunk = mine[b : b + SAMPLE_BATCH]
                picked = [self._prompt(g) for g in chunk]
                seeds = [row_seed(self.seed, f"own-{self.i}-{s}", j, g)
                         for g, (s, j, _) in zip(chunk, picked, strict=True)]  # fmt: skip
                texts = [text for _, _, text in picked]
                conts = sample_continuations(
                    model, self.tokenizer, texts, seeds, max_new_tokens=self.max_new
                )
                for g, ids, cont in zip(chunk, prompt_token_ids(self.tokenizer, texts), conts,
                                        strict=True):  # fmt: skip
                    rows[g] = (ids + cont, len(ids))
        finally:
            model.train(was_training)
        shared = gather_rows(self.ctx, [{"g": g, "ids": ids, "start": start}
                                        for g, (ids, start) in rows.items()])  # fmt: skip
        self.batch = OwnBatch(first, count, {r["g"]: (r["ids"], r["start"]) for r in shared})

    def tensors(self, step: int, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``ids`` ``[r, L]`` (right-padded) and ``mask`` ``[r, L]``: True at the positions that
        predict a sampled token (the last prompt position through the second-to-last sampled
        one; a row that stopped at once keeps its last prompt position)."""
        assert self.batch is not None
        rows = [self.batch.rows[g] for g in self.rows_of_step(step)]
        length = max(len(ids) for ids, _ in rows)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.full((len(rows), length), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.bool)
        for r, (row, start) in enumerate(rows):
            ids[r, : len(row)] = torch.tensor(row)
            mask[r, start - 1 : max(len(row) - 1, start)] = True
        return ids.to(device), mask.to(device)


def own_kl_step(
    forward: Any,
    heads: Any,
    ids: torch.Tensor,
    mask: torch.Tensor,
    lm_weight: torch.Tensor,
    *,
    scale: float,
    attr_weights: Any,
    impl: str,
) -> torch.Tensor:
    """Forward the own rows, ``scale · Σ KL(sg[q_t] ‖ p_t)`` over the masked positions, backward.

    ``ids``/``mask`` ``[r, L]``; ``scale`` is λ_own over the token count the mixture's loss is
    averaged over, so a token here weighs what a mixture token of a domain with λ_own weighs.
    Returns the per-position KL ``[n]`` (detached) for logging. The vocabulary-wide tensors are
    ``[n, V]`` for the few positions of a step's own rows (n ≈ rows × max_new_tokens).
    """
    hidden, tapped = forward(ids)  # [r, L, H], {tap: [r, L, H]} detached
    h = hidden[mask]  # [n, H]
    logits = h.float() @ lm_weight.float().T  # [n, V] fp32 whatever the model's dtypes
    regs = []
    with torch.no_grad():
        for head in heads:
            feats = head.features(tapped[head.tap])[mask]  # [n, Hk]
            regs.append(feats @ head.weight.T + head.bias)  # [n, V]
    kl = token_kl(logits, torch.stack(regs), attr_weights=attr_weights, impl=impl)  # [n]
    (scale * kl.sum()).backward()
    return kl.detach()
