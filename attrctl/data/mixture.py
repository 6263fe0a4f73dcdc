"""The fine-tuning mixture: sources drawn by weight, tokenised and packed into fixed-shape batches.

:func:`build_mixture` loads every data source of a policy and returns a :class:`Mixture`, whose
:meth:`~Mixture.examples` stream draws a source with probability ∝ its ``weight`` (not its size)
and then the next example of that source in a per-source shuffled order (reshuffled each pass).
Everything is a function of the policy seed, so a resumed run can replay the stream: ``start=k``
skips ``k`` draws without tokenising anything.

:class:`PackingCollator` turns examples into training tensors. Examples (each followed by eos,
and led by BOS where the tokenizer adds one, as sampled prompts are:
:func:`attrctl.sampling.encode_text`) are concatenated into one token stream and cut into rows
of ``seq_len``, so no compute is spent on padding; every token carries the id of the domain of
the example it came from, which is what adaptive regularization needs (λ per token =
``mixture.lambdas[domain_ids]``). Packed examples attend to their predecessors in the row, as in
GPT-style pretraining; the eos between them marks the boundary.

A templated example (classification text, :mod:`attrctl.data.template`) is the exception: it
gets a row of its own, padded after it and cut from the left to fit (:func:`labelled_ids`), so
its label is learnt from its own text exactly as ``attrctl eval`` scores it.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from attrctl.data.sources import Example, describe_source, load_source_filtered
from attrctl.policy.schema import Policy
from attrctl.sampling import bos_prefix, encode_text

IGNORE_INDEX = -100  # labels ignored by the loss (padding)


@dataclass(frozen=True)
class MixtureSource:
    """One loaded source: a label, its normalised sampling probability, its examples, and how
    many examples the ``filter`` objective dropped from it."""

    label: str
    domain: str
    probability: float
    examples: tuple[Example, ...]
    dropped: int = 0


class Mixture:
    """A policy's data sources, drawn by mixture weight, deterministic for a seed.

    Args:
        sources: the loaded sources.
        domains: domain names; a domain's id is its index here.
        lambdas: λ_d per domain id (``policy.lam_for``), shape ``[D]``.
        seed: the seed of the draw order.
    """

    def __init__(
        self,
        sources: Sequence[MixtureSource],
        domains: Sequence[str],
        lambdas: Sequence[float],
        seed: int = 0,
    ):
        if not sources:
            raise ValueError("a mixture needs at least one source")
        self.sources = tuple(sources)
        self.domains = tuple(domains)
        self.lambdas = tuple(float(x) for x in lambdas)
        self.seed = seed

    def domain_id(self, domain: str) -> int:
        """The integer id of a domain (its index in :attr:`domains`)."""
        return self.domains.index(domain)

    def lambda_tensor(self):
        """λ_d per domain id as a float32 tensor ``[D]``; index it with ``domain_ids``."""
        import torch

        return torch.tensor(self.lambdas, dtype=torch.float32)  # [D]

    def examples(self, start: int = 0) -> Iterator[Example]:
        """An endless stream of examples; ``start`` skips that many draws.

        Each draw picks a source with probability ∝ weight, then that source's next example in
        an order reshuffled at every pass over it.
        """
        rng = random.Random(f"mixture/{self.seed}")
        probs = [s.probability for s in self.sources]
        orders: list[list[int]] = [[] for _ in self.sources]
        passes = [0] * len(self.sources)
        cursors = [0] * len(self.sources)
        n = 0
        while True:
            k = rng.choices(range(len(self.sources)), weights=probs)[0]
            if cursors[k] == len(orders[k]):  # start a new pass over source k
                order = list(range(len(self.sources[k].examples)))
                random.Random(f"mixture/{self.seed}/{k}/{passes[k]}").shuffle(order)
                orders[k], cursors[k] = order, 0
                passes[k] += 1
            example = self.sources[k].examples[orders[k][cursors[k]]]
            cursors[k] += 1
            if n >= start:
                yield example
            n += 1

    def batches(
        self, tokenizer: Any, batch_size: int, seq_len: int, start: int = 0
    ) -> Iterator[dict[str, Any]]:
        """Endless fixed-shape packed batches (see :class:`PackingCollator`).

        ``start`` skips that many *batches*; skipping re-tokenises the skipped examples, which is
        cheap next to a training step.
        """
        collator = PackingCollator(tokenizer, seq_len, self.domains)
        yield from collator.stream(self.examples(), batch_size, skip=start)

    def summary(self) -> list[dict[str, Any]]:
        """One dict per source: label, domain, examples, dropped (by the filter objective),
        probability, λ."""
        return [
            {
                "source": s.label,
                "domain": s.domain,
                "examples": len(s.examples),
                "dropped": s.dropped,
                "probability": s.probability,
                "lambda": self.lambdas[self.domain_id(s.domain)],
            }
            for s in self.sources
        ]


def build_mixture(policy: Policy) -> Mixture:
    """Load every data source of ``policy`` into a :class:`Mixture`.

    Domains are numbered in order of first appearance in ``policy.data``; their λ_d come from
    ``policy.lam_for``. Under ``finetune.objective: filter`` the flagged synth rows are dropped
    (each source's ``dropped`` says how many).

    Raises:
        AttrctlError: a source cannot be read or is empty.
    """
    total = sum(s.weight for s in policy.data)
    sources = []
    for s in policy.data:
        examples, dropped = load_source_filtered(s, policy)
        sources.append(
            MixtureSource(
                label=describe_source(s),
                domain=s.domain,
                probability=s.weight / total,
                examples=tuple(examples),
                dropped=dropped,
            )
        )
    domains = list(dict.fromkeys(s.domain for s in policy.data))
    return Mixture(sources, domains, [policy.lam_for(d) for d in domains], seed=policy.seed)


class PackingCollator:
    """Tokenise examples, pack them into rows of ``seq_len`` tokens, tag every token's domain.

    Args:
        tokenizer: a HF tokenizer with ``eos_token_id`` and ``pad_token_id``.
        seq_len: tokens per row.
        domains: domain names; ``domain_ids`` hold indices into this list.
    """

    def __init__(self, tokenizer: Any, seq_len: int, domains: Sequence[str]):
        if seq_len < 2:
            raise ValueError(f"seq_len must be at least 2, got {seq_len}")
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos token; packing needs one between examples")
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.domains = tuple(domains)
        self.pad_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
        # HF tokenizers warn when a text is longer than the model's context; here a long passage
        # is cut into rows, never fed whole to the model, so the warning is noise.
        params = inspect.signature(tokenizer.__call__).parameters
        self._quiet = {"verbose": False} if "verbose" in params else {}
        # each example starts with BOS where the tokenizer adds one, as sampled prompts do
        self._bos = bos_prefix(tokenizer)

    def _encode(self, example: Example) -> tuple[list[int], int, int]:
        """The example's ids (eos last), its domain id, and how many of the ids before the eos
        are its label words (0 unless templated; see :func:`labelled_ids`)."""
        eos, dom = self.tokenizer.eos_token_id, self.domains.index(example.domain)
        if not example.label:
            ids = encode_text(self.tokenizer, example.text, bos=self._bos, **self._quiet)
            return [*ids, eos], dom, 0
        head = example.text[: len(example.text) - len(example.label)]
        ids, n_words = labelled_ids(self.tokenizer, head, example.label, self.seq_len - 1)
        return [*ids, eos], dom, n_words

    def __call__(self, examples: Iterable[Example]) -> dict[str, Any]:
        """Pack a finite list of examples into as many rows as they need (last row padded).

        Returns:
            ``input_ids`` ``[R, T]`` long, ``labels`` ``[R, T]`` long (``-100`` on padding; the
            model shifts them), ``attention_mask`` ``[R, T]`` long, ``domain_ids`` ``[R, T]``
            long (per token; padding carries the row's last domain, masked out by ``labels``),
            ``label_mask`` ``[R, T]`` bool (the label words of templated examples; only
            ``finetune.objective: classify`` reads it).
        """
        stream = _Stream()
        for example in examples:
            self._add(example, stream)
        if not stream.ids:
            raise ValueError("no examples to collate")
        rows = -(-len(stream.ids) // self.seq_len)
        return self._tensors(stream, len(stream.ids), rows)

    def _add(self, example: Example, stream: _Stream) -> None:
        """Append an example. A templated one gets a row of its own, from its first position,
        padded after it: its label is read from its own text alone, as ``attrctl eval`` scores
        it, never from a packed predecessor, and never split across rows."""
        toks, dom, n_label = self._encode(example)
        if n_label:
            stream.pad(-len(stream.ids) % self.seq_len, self.pad_id)
        stream.ids.extend(toks)
        stream.doms.extend([dom] * len(toks))
        start = len(toks) - 1 - n_label  # the label words sit just before the eos
        stream.marks.extend(start <= j < len(toks) - 1 for j in range(len(toks)))
        stream.real.extend([True] * len(toks))
        if n_label:
            stream.pad(-len(stream.ids) % self.seq_len, self.pad_id)

    def stream(
        self, examples: Iterator[Example], batch_size: int, skip: int = 0
    ) -> Iterator[dict[str, Any]]:
        """Endless ``[batch_size, seq_len]`` batches from an example stream; a long example
        continues into the next row (and batch). ``skip`` drops that many leading batches."""
        need = batch_size * self.seq_len
        stream = _Stream()
        n = 0
        for example in examples:
            self._add(example, stream)
            while len(stream.ids) >= need:
                if n >= skip:
                    yield self._tensors(stream, need, batch_size)
                stream.drop(need)
                n += 1

    def _tensors(self, stream: _Stream, size: int, rows: int) -> dict[str, Any]:
        """The first ``size`` tokens of ``stream`` as ``rows`` rows (padded to fill them)."""
        import torch

        ids, doms = stream.ids[:size], stream.doms[:size]
        pad = rows * self.seq_len - len(ids)
        shape = (rows, self.seq_len)
        input_ids = torch.tensor(ids + [self.pad_id] * pad).view(shape)  # [R, T]
        real = torch.tensor(stream.real[:size] + [False] * pad).view(shape)  # [R, T]
        return {
            "input_ids": input_ids,
            "labels": input_ids.masked_fill(~real, IGNORE_INDEX),  # [R, T]
            "attention_mask": real.long(),  # [R, T]
            "domain_ids": torch.tensor(doms + [doms[-1]] * pad).view(shape),  # [R, T]
            # the label words' tokens of templated examples (what `classify` trains on)
            "label_mask": torch.tensor(stream.marks[:size] + [False] * pad).view(shape),
        }


class _Stream:
    """The packed token stream: ids, their domain ids, label-word marks, and which are real
    tokens (padding closes a templated example's row)."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.doms: list[int] = []
        self.marks: list[bool] = []
        self.real: list[bool] = []

    def pad(self, n: int, pad_id: int) -> None:
        if n and self.ids:
            self.ids += [pad_id] * n
            self.doms += [self.doms[-1]] * n
            self.marks += [False] * n
            self.real += [False] * n

    def drop(self, n: int) -> None:
        del self.ids[:n], self.doms[:n], self.marks[:n], self.real[:n]


def labelled_ids(tokenizer: Any, head: str, words: str, max_len: int) -> tuple[list[int], int]:
    """The ids of a templated text — the text before the label, then the label words encoded as
    its continuation — and how many of them are the label words; at most ``max_len`` ids, the
    text before the label cut from the left to fit. Training (:class:`PackingCollator`) and
    ``attrctl eval``'s ROC-AUC (:mod:`attrctl.eval.classify`) encode alike through this.

    An empty text before the label starts from BOS (EOS where there is none), as sampling starts
    an empty prompt (:func:`attrctl.sampling.prompt_token_ids`).

    Raises:
        AttrctlError: the label words alone do not fit ``max_len`` with one token before them.
    """
    from attrctl.errors import AttrctlError
    from attrctl.sampling import prompt_token_ids

    ids = prompt_token_ids(tokenizer, [head])[0]
    tail = list(tokenizer(words, add_special_tokens=False)["input_ids"])
    if len(tail) + 1 > max_len:
        raise AttrctlError(
            f"template.label_words: {words!r} is {len(tail)} tokens, too long for sequences of "
            f"{max_len + 1} with the text before it and an eos; raise finetune.seq_len"
        )
    return ids[max(0, len(ids) + len(tail) - max_len) :] + tail, len(tail)
