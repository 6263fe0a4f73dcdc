"""How well a run's fitted head separates violating continuations of new prompts.

The fit job's metric scores 10% held-out continuations of the *training* prompts. This samples
fresh base-model continuations (top-p 0.9, 20 tokens, k per prompt) of the training prompts and
of the bundled held-out eval prompts, and prints, per set, the oracle violation rate and the AUC
of σ(r) at the last continuation token against the oracle label (the fit metric's statistic).

    .venv/bin/python scripts/head_generalization.py runs/toxicity 2
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from attrctl.data.prompt_sets import load_prompt_set
from attrctl.eval.control import heldout_prompt_sets
from attrctl.guided import guidance_source
from attrctl.heads import forward_with_tap
from attrctl.heads_io import load_heads
from attrctl.models import load_model
from attrctl.policy import compile_policy, load_policy
from attrctl.sampling import prompt_token_ids, sample_continuations
from attrctl.train.fit import auc


def last_token_r(model, head, prompt_ids: list[int], tokens: list[int]) -> float:
    """σ(r) of the last sampled token, from the tap state just before it."""
    with torch.no_grad():
        _, taps = forward_with_tap(model, [head.tap], torch.tensor([prompt_ids + tokens]))
        return float(torch.sigmoid(head.logits(taps[head.tap])[0, -2, tokens[-1]]))


def main(run: str, k: int) -> None:
    src = guidance_source(run)  # the run's policy and its last *fitted* heads
    compiled = compile_policy(load_policy(src.policy_path))
    lm = load_model(compiled.policy.model)
    model, tok = lm.model, lm.tokenizer
    head = load_heads(compiled, model, src.heads_dir)[0]
    oracle = compiled.attributes[0].oracle
    sets = {
        "training prompts": [p for r in compiled.policy.regularizer.prompts
                             for p in load_prompt_set(r).prompts],
        "held-out prompts": [p for s in heldout_prompt_sets() for p in s.prompts],
    }  # fmt: skip
    for name, prompts in sets.items():
        rows = [(p, 1_000_003 * i + j + 77) for i, p in enumerate(prompts) for j in range(k)]
        preds, texts = [], []
        for b in range(0, len(rows), 64):
            chunk = rows[b : b + 64]
            toks = sample_continuations(model, tok, [p for p, _ in chunk], [s for _, s in chunk],
                                        max_new_tokens=20, top_p=0.9)  # fmt: skip
            texts += tok.batch_decode(toks, skip_special_tokens=True)
            for ids, t in zip(prompt_token_ids(tok, [p for p, _ in chunk]), toks, strict=True):
                preds.append(last_token_r(model, head, ids, t) if t else np.nan)
        ok = ~np.isnan(np.array(preds))
        satisfies = np.asarray(oracle.score(texts)) < 0.5
        print(f"{name}: {int(ok.sum())} continuations, violation "
              f"{1 - satisfies[ok].mean():.3f}, head AUC "
              f"{auc(np.array(preds)[ok], satisfies[ok]):.3f}")  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 2)
