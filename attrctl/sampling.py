"""The one sampler: seeded, batched, KV-cached continuations of prompts.

Used by ``data synth`` (toxic-domain data), by training (the samples each iteration's heads are
fitted on) and by evaluation. Each row draws from its own ``torch.Generator``, so a row's sample
does not depend on its batch-mates or on the batch size, which is what makes resumed and sharded
sampling reproduce an uninterrupted single-process run.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def row_seed(seed: int, prompt_set: str, prompt_index: int, sample: int) -> int:
    """The sampling seed of one row, from (policy seed, set, prompt index, sample index).

    File prompt sets contribute their file name only, so moving a file keeps its seeds.
    """
    label = Path(prompt_set).name
    digest = hashlib.sha256(f"{seed}/{label}/{prompt_index}/{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


# Nucleus candidates: the top-p prefix is looked for among the TOP_P_CANDIDATES most likely tokens
# first (a partial top-k, ~15 ms at [64, 49k] on 2 cores) and only rows whose nucleus is wider fall
# back to a full sort (~120 ms at that shape, ~30% of a sampling step when done for every row).
TOP_P_CANDIDATES = 1024


def _next_token_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Sampling distribution ``[B, V]`` from last-position logits ``[B, V]``.

    With ``top_p < 1`` the smallest prefix of the descending probabilities whose mass reaches
    ``top_p`` is kept (the first token always stays) and the rest is zeroed; the result is the
    same as sorting the whole row, because the prefix sums of the top-k values are those of the
    full sort.
    """
    import torch

    probs = torch.softmax(logits.float() / temperature, dim=-1)  # [B, V]
    if top_p >= 1.0:
        return probs
    vocab = probs.shape[-1]
    top, order = probs.topk(min(TOP_P_CANDIDATES, vocab), dim=-1)  # [B, k] descending
    kept, open_ended = _nucleus(top, top_p)  # [B, k], [B]
    out = torch.zeros_like(probs).scatter_(-1, order, kept)  # [B, V]
    if top.shape[-1] < vocab and bool(open_ended.any()):
        # the last candidate is still inside the nucleus, which may go on past it: sort those
        # rows whole (rare at T = 1 for SmolLM2: a flat distribution, e.g. after a newline)
        rows = open_ended.nonzero().view(-1)  # [b]
        full, full_order = probs[rows].sort(dim=-1, descending=True)  # [b, V]
        out[rows] = torch.zeros_like(full).scatter_(-1, full_order, _nucleus(full, top_p)[0])
    return out


def _nucleus(sorted_p: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``sorted_p`` ``[B, n]`` (descending) with every entry after the top-p prefix zeroed, and
    ``[B]`` whether the prefix reaches the last entry (the mass before it is under ``top_p``)."""
    drop = sorted_p.cumsum(-1) - sorted_p >= top_p  # [B, n]: the mass before it reaches top_p
    return sorted_p.masked_fill(drop, 0.0), ~drop[:, -1]


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Token ids ``[B]`` drawn from ``probs`` ``[B, V]`` with uniforms ``u`` ``[B]`` in [0, 1).

    Each row depends only on its own probabilities and uniform. ``side="right"`` never lands on
    a zero-probability token (its CDF step is flat).
    """
    import torch

    cdf = probs.double().cumsum(-1)  # [B, V]; float64 so the tail of 49k terms stays exact
    target = (u.double() * cdf[:, -1]).unsqueeze(-1)  # [B, 1]
    idx = torch.searchsorted(cdf, target, side="right").squeeze(-1)  # [B]
    return idx.clamp(max=probs.shape[-1] - 1)


def bos_prefix(tokenizer: Any) -> list[int]:
    """``[bos_token_id]`` where the tokenizer prepends BOS by default (Llama-2/3: ``tok("x")``
    begins with it), else ``[]`` (SmolLM2, GPT-2, tiny-random)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    ids = tokenizer("x", add_special_tokens=True)["input_ids"]
    return [bos] if list(ids[:1]) == [bos] else []


def encode_text(
    tokenizer: Any, text: str, *, bos: list[int] | None = None, **kwargs: Any
) -> list[int]:
    """The ids of ``text`` at the start of a sequence — the one rule for every sequence attrctl
    feeds the model (sampled prompts, fitted sample rows, training examples, eval contexts).

    The text is encoded without special tokens and, where the tokenizer adds a BOS by default
    (:func:`bos_prefix`), BOS goes in front — exactly once, also when the text itself begins with
    the BOS token. Text that continues a sequence (a continuation, a choice) is encoded with
    ``add_special_tokens=False`` and appended. ``bos``: a precomputed :func:`bos_prefix`, for
    callers encoding many texts; ``kwargs`` go to the tokenizer call.
    """
    prefix = bos_prefix(tokenizer) if bos is None else bos
    ids = list(tokenizer(text, add_special_tokens=False, **kwargs)["input_ids"])
    return ids if ids[: len(prefix)] == prefix else prefix + ids


def prompt_token_ids(tokenizer: Any, prompts: Sequence[str]) -> list[list[int]]:
    """The ids the sampler conditions each prompt on (:func:`encode_text`).

    A prompt that encodes to no token at all (``""`` with a tokenizer that adds no BOS) starts from
    the BOS token — EOS where there is none — as ``generate`` does without input: a row needs at
    least one real position to attend to.
    """
    bos = bos_prefix(tokenizer)
    ids = [encode_text(tokenizer, p, bos=bos) for p in prompts]
    if any(not row for row in ids):
        start = tokenizer.bos_token_id
        start = tokenizer.eos_token_id if start is None else start
        if start is None:
            raise ValueError("an empty prompt needs a BOS or EOS token to start from")
        ids = [row or [start] for row in ids]
    return ids


def encode_prompts(tokenizer: Any, prompts: Sequence[str]) -> Any:
    """Left-padded ``input_ids`` and ``attention_mask`` ``[B, P]`` of :func:`prompt_token_ids`."""
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        return tokenizer.pad(
            {"input_ids": prompt_token_ids(tokenizer, prompts)}, padding=True, return_tensors="pt"
        )
    finally:
        tokenizer.padding_side = side


def sample_continuations(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    logits_processor: Any = None,
) -> list[list[int]]:
    """Sample one continuation per prompt with a KV cache, each row from its own generator.

    HF ``generate`` draws every row from the global RNG, so a row's sample would depend on its
    batch-mates; here row ``i`` draws only from ``torch.Generator().manual_seed(seeds[i])``
    (one uniform per step, turned into a token by inverse-CDF lookup).

    Args:
        model: a causal LM (``model(input_ids, attention_mask, position_ids, past_key_values)``).
        tokenizer: its tokenizer; must have a pad token. Prompts are left-padded.
        prompts: ``B`` prompt strings.
        seeds: ``B`` seeds, one per row.
        max_new_tokens: tokens to sample per row; a row stops early at a stop token
            (:func:`stop_token_ids`).
        temperature: softmax temperature.
        top_p: nucleus mass (1.0: plain sampling).
        logits_processor: None, or a callable ``(input_ids [B, T], scores [B, V]) -> scores`` —
            a transformers ``LogitsProcessor`` or ``LogitsProcessorList`` — applied to each
            step's next-token logits before temperature and top-p (guided decoding:
            :mod:`attrctl.guided`). ``input_ids`` are the left-padded prompts plus the tokens
            sampled so far.

    Returns:
        ``B`` lists of sampled token ids, the stop token excluded.
    """
    import torch

    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; set one before sampling")
    enc = encode_prompts(tokenizer, prompts)
    device = next(model.parameters()).device
    input_ids = enc["input_ids"].to(device)  # [B, P]
    attn = enc["attention_mask"].to(device)  # [B, P]
    # Left padding must not shift the real tokens' positions: count them from the mask.
    pos = (attn.cumsum(-1) - 1).clamp(min=0)  # [B, P]
    batch = input_ids.shape[0]
    # One uniform per row and step, drawn up front from the row's own generator: sampling is then
    # one batched inverse-CDF lookup per step instead of B multinomial calls (~1 ms each at V=49k).
    uniforms = torch.stack(
        [torch.rand(max_new_tokens, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    )  # [B, max_new_tokens]
    stop = stop_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id
    extra = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}

    tokens: list[list[int]] = [[] for _ in range(batch)]
    done = [False] * batch
    # transformers 5 names the KV cache `cache`; 4.x `past_key_values` (5 warns on the old name)
    cache_kw = "cache" if _accepts(model, "cache") else "past_key_values"
    extra[cache_kw] = _new_cache(model)
    with torch.inference_mode():
        out = model(
            input_ids=input_ids, attention_mask=attn, position_ids=pos, use_cache=True, **extra
        )
        seq = input_ids  # [B, P + step]: what a logits processor sees
        for step in range(max_new_tokens):
            logits = out.logits[:, -1]  # [B, V]
            if logits_processor is not None:
                logits = logits_processor(seq, logits.float())
            probs = _next_token_probs(logits, temperature, top_p).cpu()  # [B, V]
            picked = _inverse_cdf(probs, uniforms[:, step]).tolist()
            for i, tok in enumerate(picked):
                if done[i]:
                    continue
                if tok in stop:
                    done[i] = True
                else:
                    tokens[i].append(tok)
            if all(done) or step == max_new_tokens - 1:
                break
            feed = torch.tensor(
                [pad if d else t for d, t in zip(done, picked, strict=True)], device=device
            )
            seq = torch.cat([seq, feed[:, None]], dim=1)
            attn = torch.cat([attn, attn.new_ones(batch, 1)], dim=1)  # [B, P + step + 1]
            pos = pos[:, -1:] + 1  # [B, 1]
            out = model(
                input_ids=feed[:, None],  # [B, 1]
                attention_mask=attn,
                position_ids=pos,
                use_cache=True,
                **extra,
            )
    return tokens


def stop_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """Token ids that end a continuation: the tokenizer's and generation config's eos, and every
    other special token (an instruct model ends plain text with ``<|endoftext|>``, not its chat
    eos; no special token is plain text)."""
    ids = {tokenizer.eos_token_id, *getattr(tokenizer, "all_special_ids", [])}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    return {int(i) for i in ids if i is not None}


def _accepts(model: Any, name: str) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wrapper
    try:
        return name in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


def _new_cache(model: Any):
    """An empty transformers ``DynamicCache`` (the current cache API: passing legacy tuples, or
    nothing and reusing ``out.past_key_values``, warns on every batch in recent releases)."""
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # older transformers: no config argument
        return DynamicCache()
