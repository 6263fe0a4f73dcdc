"""Utility: perplexity on held-out Shakespeare plays and zero-shot BIG-bench multiple choice.

Both read log-probabilities of given tokens under a model (teacher forcing), through
:func:`token_logprobs`, which batches sequences by a token budget so the ``[rows, T, V]`` logits
of a batch stay near 128 MiB whatever the vocabulary.

- **Held-out perplexity**: the plays of :data:`attrctl.data.shakespeare.HELDOUT_WORKS` (never in
  the training mixture), tokenized as one stream in file order, cut into non-overlapping windows
  (each led by BOS where the tokenizer adds one, as every sequence is:
  :func:`attrctl.sampling.encode_text`); ``exp`` of the mean negative log-likelihood of every
  token after a window's first, over the first ``max_tokens`` such tokens.
- **Multiple choice**: each choice is scored as a continuation of the task's prompt (BIG-bench's
  default formatting, :meth:`attrctl.tasks.BigBenchTask.prompt`); the model picks the choice with
  the highest log-likelihood per token (length normalisation, so long answers are not penalised
  for their length). A pick is correct when its target score is the highest. Up to
  ``max_examples`` examples per task, a fixed seeded subset (the same for every model).
"""

from __future__ import annotations

import inspect
import math
import random
from collections.abc import Sequence
from typing import Any

from attrctl.eval.metrics import mean_stderr
from attrctl.sampling import bos_prefix, encode_text

#: fp32 logits per batch: rows × T × V ≤ this many (2**25 floats = 128 MiB).
LOGIT_BUDGET = 2**25


def token_logprobs(
    model: Any, sequences: Sequence[Sequence[int]], starts: Sequence[int], bar: Any = None
) -> list[tuple[float, int]]:
    """Sum of ``log p(x_t | x_<t)`` over ``t >= start`` for each sequence, and how many tokens.

    Args:
        model: a causal LM.
        sequences: token ids per sequence.
        starts: per sequence, the first position whose token is scored (``>= 1``).
        bar: optional progress bar, advanced by one per sequence.

    Returns:
        ``(log-likelihood, tokens scored)`` per sequence, in input order.
    """
    import torch

    vocab = int(model.get_output_embeddings().weight.shape[0])
    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda j: -len(sequences[j]))  # little padding
    out: list[tuple[float, int]] = [(0.0, 0)] * len(sequences)
    b = 0
    while b < len(order):
        longest = max(len(sequences[order[b]]), 1)
        rows = max(1, LOGIT_BUDGET // (longest * vocab))
        chunk = order[b : b + rows]
        b += len(chunk)
        ids = torch.zeros(len(chunk), longest, dtype=torch.long)  # right padding: causal rows
        attn = torch.zeros(len(chunk), longest, dtype=torch.long)  # are unaffected by it
        score = torch.zeros(len(chunk), longest, dtype=torch.bool)  # [n, T]: token t is scored
        for r, j in enumerate(chunk):
            seq = sequences[j]
            ids[r, : len(seq)] = torch.tensor(list(seq), dtype=torch.long)
            attn[r, : len(seq)] = 1
            score[r, max(starts[j], 1) : len(seq)] = True
        with torch.inference_mode():
            logits = model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits
            logits = logits[:, :-1].float()  # [n, T-1, V]: position t predicts token t+1
            picked = logits.gather(-1, ids[:, 1:, None].to(device)).squeeze(-1)  # [n, T-1]
            logp = (picked - torch.logsumexp(logits, dim=-1)).cpu()  # [n, T-1]
        mask = score[:, 1:]  # [n, T-1]
        for r, j in enumerate(chunk):
            out[j] = (float(logp[r][mask[r]].double().sum()), int(mask[r].sum()))
        if bar is not None:
            bar.update(len(chunk))
    return out


# ------------------------------------------------------------------------------------ perplexity
def heldout_windows(tokenizer: Any, texts: Sequence[str], max_tokens: int, window: int) -> list:
    """Non-overlapping windows of the texts' token stream holding ``max_tokens`` scored tokens.

    Each window scores all its tokens but the first, so a full window scores ``window - 1``.
    Where the tokenizer adds a BOS, each window is BOS and the next ``window - 1`` stream tokens
    (all scored); else it is the next ``window`` stream tokens.
    """
    need = max_tokens + math.ceil(max_tokens / (window - 1))  # scored tokens + one per window
    # HF tokenizers warn when a text is longer than the model's context; the stream is cut into
    # windows, never fed whole to the model, so the warning is noise.
    quiet = (
        {"verbose": False} if "verbose" in inspect.signature(tokenizer.__call__).parameters else {}
    )
    stream: list[int] = []
    for text in texts:
        if len(stream) >= need:
            break
        stream += tokenizer(text + "\n\n", add_special_tokens=False, **quiet)["input_ids"]
    bos = bos_prefix(tokenizer)
    step = window - len(bos)  # stream tokens per window
    windows, scored = [], 0
    for b in range(0, len(stream), step):
        take = min(step, max_tokens - scored + 1 - len(bos), len(stream) - b)
        if take + len(bos) < 2:
            break
        windows.append(bos + stream[b : b + take])
        scored += take + len(bos) - 1
    return windows


def heldout_perplexity(
    model: Any, tokenizer: Any, texts: Sequence[str], *, max_tokens: int, window: int, bar=None
) -> dict[str, Any]:
    """Perplexity of ``model`` on ``texts`` (the held-out plays): ``{"value", "tokens", "window"}``."""
    windows = heldout_windows(tokenizer, texts, max_tokens, window)
    return windows_perplexity(model, windows, window, bar=bar)


def windows_perplexity(
    model: Any, windows: Sequence[Sequence[int]], window: int, bar=None
) -> dict[str, Any]:
    """Perplexity over every token of each window (of at most ``window`` tokens) but its first:
    ``{"value", "tokens", "window"}``."""
    scored = token_logprobs(model, windows, [1] * len(windows), bar=bar)
    nll = -sum(lp for lp, _ in scored)
    tokens = sum(n for _, n in scored)
    value = math.exp(nll / tokens) if tokens else None
    return {"value": value, "tokens": tokens, "window": window}


# ------------------------------------------------------------------------------ multiple choice
def pick_choice(logliks: Sequence[float], n_tokens: Sequence[int]) -> int:
    """Index of the choice with the highest log-likelihood per token (the first on ties)."""
    normed = [ll / max(n, 1) for ll, n in zip(logliks, n_tokens, strict=True)]
    return max(range(len(normed)), key=lambda i: (normed[i], -i))


def mc_examples(task: Any, max_examples: int) -> list:
    """A fixed subset of a task's examples (seeded by the task's name, not by the eval seed, so
    every model answers the same questions), in file order."""
    n = len(task.examples)
    if n <= max_examples:
        return list(task.examples)
    keep = sorted(random.Random(f"mc/{task.name}").sample(range(n), max_examples))
    return [task.examples[i] for i in keep]


def choice_sequences(tokenizer: Any, prompt: str, choices: Sequence[str]) -> list[tuple[list, int]]:
    """``(context + choice ids, start of the choice)`` per choice.

    The context's trailing spaces move onto the choice ("A: " + "x" → "A:" + " x"), as BPE
    tokenizers attach a space to the word after it; the choice's ids are then the same whatever
    the context.
    """
    context = prompt.rstrip(" ")
    lead = prompt[len(context) :]
    ctx = encode_text(tokenizer, context)
    out = []
    for choice in choices:
        ids = tokenizer(lead + choice, add_special_tokens=False)["input_ids"]
        out.append((list(ctx) + list(ids), len(ctx)))
    return out


def mc_accuracy(
    model: Any, tokenizer: Any, tasks: Sequence[Any], *, max_examples: int, bar=None
) -> dict[str, Any]:
    """Zero-shot accuracy per task and overall (macro average over tasks), beside chance.

    Returns:
        ``{"tasks": {name: {"accuracy", "stderr", "chance", "n"}}, "accuracy", "stderr",
        "chance"}``; the overall stderr is ``sqrt(Σ stderr_t²) / T``.
    """
    per_task = {}
    for task in tasks:
        examples = mc_examples(task, max_examples)
        seqs, starts, owner = [], [], []
        for e, ex in enumerate(examples):
            for ids, start in choice_sequences(tokenizer, task.prompt(ex), ex.choices):
                seqs.append(ids)
                starts.append(start)
                owner.append(e)
        scored = token_logprobs(model, seqs, starts, bar=bar)
        correct = []
        for e, ex in enumerate(examples):
            mine = [s for s, o in zip(scored, owner, strict=True) if o == e]
            pick = pick_choice([ll for ll, _ in mine], [n for _, n in mine])
            correct.append(float(ex.scores[pick] == max(ex.scores)))
        acc, se = mean_stderr(correct)
        chance = sum(1 / len(ex.choices) for ex in examples) / len(examples)
        per_task[task.name] = {"accuracy": acc, "stderr": se, "chance": chance, "n": len(examples)}
    t = len(per_task)
    return {
        "tasks": per_task,
        "accuracy": sum(v["accuracy"] for v in per_task.values()) / t,
        "stderr": math.sqrt(sum(v["stderr"] ** 2 for v in per_task.values())) / t,
        "chance": sum(v["chance"] for v in per_task.values()) / t,
    }
