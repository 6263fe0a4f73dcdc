"""One BOS rule for every sequence fed to the model (:func:`attrctl.sampling.encode_text`).

A sequence starts with the tokenizer's BOS where the tokenizer adds one by default (Llama-2/3),
never twice; continuations are encoded without special tokens and appended. Checked with the
tiny-random tokenizer as it is (adds no BOS) and reconfigured to prepend ``<|im_start|>`` (id 1)
as its BOS: head fitting (``train.fit._encode``) sees exactly the ids the sampler conditioned on
while generating a row, the training mixture's examples start with BOS, and the eval sequences
(held-out windows, multiple-choice contexts) do too.
"""

from __future__ import annotations

import re

import pytest
import torch
from transformers import AutoTokenizer

from attrctl import sampling
from attrctl.data.mixture import IGNORE_INDEX, PackingCollator
from attrctl.data.sources import Example
from attrctl.eval import utility
from attrctl.models import load_model
from attrctl.models.load import TINY_TOKENIZER_DIR
from attrctl.train.fit import _encode

BOS = 1  # <|im_start|>, the BOS of the BOS-adding variant
EOS = 0  # <|endoftext|>: eos (and bos) of the plain tokenizer
PAD = 2  # <|im_end|>: a pad id distinct from BOS and EOS, so prompts can be read back unpadded
PROMPTS = ["The weather today is", "You", "", "<|im_start|>I think"]  # "" and a literal BOS


def tokenizer(adds_bos: bool):
    extra = {"bos_token": "<|im_start|>", "add_bos_token": True} if adds_bos else {}
    tok = AutoTokenizer.from_pretrained(str(TINY_TOKENIZER_DIR), pad_token="<|im_end|>", **extra)
    assert (tok("x")["input_ids"][0] == BOS) is adds_bos  # the variant is what the test needs
    return tok


@pytest.fixture(scope="module")
def model():
    return load_model("tiny-random").model


class WordsOnly:
    """Samples only whole-word tokens (``Ġ`` + letters) that decode and re-encode to themselves
    — so the decoded continuation re-encodes to the sampled ids — and records every step's
    ``input_ids``."""

    def __init__(self, tok):
        names = tok.convert_ids_to_tokens(list(range(len(tok))))
        self.allowed = torch.tensor([
            i for i, s in enumerate(names)
            if re.fullmatch("Ġ[A-Za-z]+", s)
            and tok(tok.decode([i]), add_special_tokens=False)["input_ids"] == [i]
        ])  # fmt: skip
        assert len(self.allowed) > 20
        self.seen: list[torch.Tensor] = []

    def __call__(self, input_ids, scores):
        self.seen.append(input_ids.detach().cpu().clone())
        keep = torch.full_like(scores, float("-inf"))
        keep[:, self.allowed] = 0
        return scores + keep


@pytest.mark.parametrize("adds_bos", [True, False], ids=["bos", "no-bos"])
def test_fit_encodes_the_ids_the_sampler_conditioned_on(model, adds_bos):
    tok = tokenizer(adds_bos)
    proc = WordsOnly(tok)
    new = 6
    gen = sampling.sample_continuations(
        model, tok, PROMPTS, [11, 12, 13, 14], max_new_tokens=new, logits_processor=proc
    )
    assert [len(g) for g in gen] == [new] * len(PROMPTS)  # words only: no early stop
    texts = tok.batch_decode(gen, skip_special_tokens=True)
    encoded = _encode(
        tok, [{"prompt": p, "continuation": t} for p, t in zip(PROMPTS, texts, strict=True)]
    )

    first, last = proc.seen[0], proc.seen[-1]  # [B, P] prompts; [B, P + new - 1]
    for b, (ids, plen) in enumerate(encoded):
        prompt = [t for t in first[b].tolist() if t != PAD]  # left padding off
        conditioned = [t for t in last[b].tolist() if t != PAD] + [gen[b][-1]]
        assert conditioned == prompt + list(gen[b])
        assert ids == conditioned  # the fit sees the positions the sampler produced
        assert plen == len(prompt)
        if adds_bos:  # BOS leads every row exactly once, the literal one included
            assert ids[0] == BOS and ids.count(BOS) == 1
        elif PROMPTS[b]:  # as the tokenizer's default encoding: no BOS added
            assert prompt == tok(PROMPTS[b])["input_ids"]
        else:  # an empty prompt starts from the start token (EOS for this tokenizer)
            assert prompt == [EOS]


@pytest.mark.parametrize("adds_bos", [True, False], ids=["bos", "no-bos"])
def test_mixture_examples_start_with_bos_where_the_tokenizer_adds_one(adds_bos):
    tok = tokenizer(adds_bos)
    texts = ["hello world", "<|im_start|>again"]
    batch = PackingCollator(tok, seq_len=8, domains=["general"])(
        [Example(t, "general") for t in texts]
    )
    real = batch["labels"] != IGNORE_INDEX
    stream = batch["input_ids"][real].tolist()
    plain = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    if adds_bos:
        want = [BOS, *plain[0], EOS, *plain[1], EOS]  # the second's literal BOS is its only one
        assert batch["input_ids"][0, 0] == BOS
    else:
        want = [*plain[0], EOS, *plain[1], EOS]
    assert stream == want


@pytest.mark.parametrize("adds_bos", [True, False], ids=["bos", "no-bos"])
def test_encode_text_puts_bos_once(adds_bos):
    tok = tokenizer(adds_bos)
    assert sampling.bos_prefix(tok) == ([BOS] if adds_bos else [])
    for text in ["x", "hello world", ""]:
        plain = tok(text, add_special_tokens=False)["input_ids"]
        assert sampling.encode_text(tok, text) == ([BOS] if adds_bos else []) + plain
        assert sampling.encode_text(tok, text) == tok(text)["input_ids"]  # the default, once
    # the default encoding doubles a literal BOS; the rule does not
    assert sampling.encode_text(tok, "<|im_start|>x") == [BOS, *tok("x", add_special_tokens=False)["input_ids"]]  # fmt: skip


def test_eval_sequences_start_with_bos():
    tok, plain = tokenizer(True), tokenizer(False)
    text = " ".join(f"word{i}" for i in range(400))
    windows = utility.heldout_windows(tok, [text], max_tokens=10, window=4)
    assert [w[0] for w in windows] == [BOS] * 4 and [len(w) for w in windows] == [4, 4, 4, 2]
    stream = tok(text + "\n\n", add_special_tokens=False)["input_ids"]
    assert [t for w in windows for t in w[1:]] == stream[:10]  # 10 scored tokens, BOS never one
    assert utility.heldout_windows(plain, [text], max_tokens=10, window=4) == [
        stream[0:4], stream[4:8], stream[8:12], stream[12:14]
    ]  # fmt: skip
    [(ids, start)] = utility.choice_sequences(tok, "Q: pick\nA: ", ["yes"])
    assert ids[:start] == tok("Q: pick\nA:")["input_ids"] and ids[0] == BOS
    for t in (tok, plain):  # a literal BOS: once, whether or not the tokenizer adds one
        [(ids, start)] = utility.choice_sequences(t, "<|im_start|>Q: pick\nA: ", ["yes"])
        assert ids[:start] == [BOS, *t("Q: pick\nA:", add_special_tokens=False)["input_ids"]]
        assert ids[start:] == t(" yes", add_special_tokens=False)["input_ids"]
