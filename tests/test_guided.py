"""NADO guided decoding (`attrctl.guided`) on tiny-random, with hand-set heads.

The processor adds ``Σ_k w_k logσ(r_k)`` to each step's logits from hidden states its hooks take
during the model's own forward. Checked here: zero heads change nothing; a head that marks one
token takes it out of greedy decoding and scales its probability by exactly ``σ(b)/σ(0)``; the
hooks go away on close; HF ``generate`` and attrctl's sampler agree with it; a left-padded batch
gives each row what it gets alone (every head kind, every kind of tap).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LogitsProcessorList

from attrctl.guided import NadoLogitsProcessor
from attrctl.heads import FINAL, RegularizerHead
from attrctl.models import load_model
from attrctl.policy.schema import HeadSpec
from attrctl.sampling import sample_continuations

PROMPTS = ["The weather today is", "You", "I think that you are a very"]  # unequal lengths


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-random")


def make_head(model, kind: str = "linear", tap: int = FINAL, *, random: bool = False, **spec):
    spec = {"rank": 8, **spec}
    if kind == "mlp":
        spec.setdefault("hidden_size", 16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7 + tap)
        head = RegularizerHead(HeadSpec(kind=kind, **spec), model, tap)
        if random:  # a projection that makes r vary over tokens and positions
            with torch.no_grad():
                head.weight.normal_(0, 1.0)
                head.bias.normal_(0, 1.0)
    return head


class Record:
    """A pass-through logits processor that keeps what it saw."""

    def __init__(self):
        self.scores: list[torch.Tensor] = []

    def __call__(self, input_ids, scores):
        self.scores.append(scores.detach().clone())
        return scores


def greedy(model, tok, prompts, processors=(), new=6):
    enc = tok(prompts, return_tensors="pt", padding=True)
    out = model.generate(
        **enc, do_sample=False, max_new_tokens=new, pad_token_id=tok.pad_token_id,
        logits_processor=LogitsProcessorList(list(processors)),
    )  # fmt: skip
    return out[:, enc["input_ids"].shape[1] :]  # [B, new]


def hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_zero_heads_leave_the_distribution_unchanged(tiny):
    model, tok = tiny.model, tiny.tokenizer
    heads = [make_head(model), make_head(model, "mlp", tap=1)]
    raw, seen = Record(), Record()
    with NadoLogitsProcessor(model, heads, [1.0, 0.5]) as proc:
        guided = greedy(model, tok, PROMPTS, [raw, proc, seen])
        # σ(0) = ½ everywhere: every logit moves by (1 + 0.5)·log ½, the softmax not at all
        for a, b in zip(raw.scores, seen.scores, strict=True):
            assert torch.allclose(b - a, torch.full_like(a, -1.5 * math.log(2)), atol=1e-5)
            assert torch.allclose(a.softmax(-1), b.softmax(-1), atol=1e-6)
        seeds = [11, 12, 13]
        with_proc = sample_continuations(model, tok, PROMPTS, seeds, max_new_tokens=8,
                                         logits_processor=proc)  # fmt: skip
    assert torch.equal(guided, greedy(model, tok, PROMPTS))
    assert with_proc == sample_continuations(model, tok, PROMPTS, seeds, max_new_tokens=8)


def test_a_penalised_token_is_never_emitted(tiny):
    model, tok = tiny.model, tiny.tokenizer
    plain = greedy(model, tok, PROMPTS, new=8)
    ids, counts = plain.flatten().unique(return_counts=True)
    target = int(ids[counts.argmax()])  # the token unguided greedy decoding emits most
    head = make_head(model)
    with torch.no_grad():
        head.bias[target] = -30.0  # R(target) = σ(-30): continuations through it fail
    with NadoLogitsProcessor(model, [head]) as proc:
        guided = greedy(model, tok, PROMPTS, [proc], new=8)
        sampled = sample_continuations(model, tok, PROMPTS * 4, list(range(12)),
                                       max_new_tokens=8, temperature=2.0, logits_processor=proc)  # fmt: skip
    assert (plain == target).any()
    assert not (guided == target).any()
    assert all(target not in row for row in sampled)


def test_probability_drops_by_the_expected_factor(tiny):
    """p_q(x)/p_q(y) = p(x)/p(y) · σ(b_x)/σ(b_y): with b = -2 on one token and 0 elsewhere, that
    token loses a factor 2σ(-2) ≈ 0.238 against every other token, at every step."""
    model, tok = tiny.model, tiny.tokenizer
    target, b = 5, -2.0
    head = make_head(model)
    with torch.no_grad():
        head.bias[target] = b
    raw, seen = Record(), Record()

    def chain(ids, scores):
        return seen(ids, proc(ids, raw(ids, scores)))

    with NadoLogitsProcessor(model, [head], strength=1.0) as proc:
        sample_continuations(model, tok, PROMPTS, [1, 2, 3], max_new_tokens=5,
                             logits_processor=chain)  # fmt: skip
    expected = math.log(2 * torch.sigmoid(torch.tensor(b)).item())
    assert len(raw.scores) == 5
    for a, q in zip(raw.scores, seen.scores, strict=True):
        d = F.log_softmax(q, -1) - F.log_softmax(a, -1)  # [B, V]
        others = torch.cat([d[:, :target], d[:, target + 1 :]], dim=1)
        assert torch.allclose(others, others[:, :1].expand_as(others), atol=1e-5)
        assert torch.allclose(d[:, target] - others[:, 0], torch.tensor(expected), atol=1e-5)


def test_strength_scales_the_guidance(tiny):
    model, tok = tiny.model, tiny.tokenizer
    head = make_head(model, random=True)
    terms = {}
    for alpha in (0.0, 1.0, 2.5):
        raw, seen = Record(), Record()
        with NadoLogitsProcessor(model, [head], strength=alpha) as proc:
            greedy(model, tok, PROMPTS[:1], [raw, proc, seen], new=1)
        terms[alpha] = seen.scores[0] - raw.scores[0]
    assert torch.equal(terms[0.0], torch.zeros_like(terms[0.0]))
    assert torch.allclose(terms[2.5], 2.5 * terms[1.0], atol=1e-5)


def test_hooks_are_removed_on_close(tiny):
    model, tok = tiny.model, tiny.tokenizer
    before = hook_count(model)
    heads = [make_head(model), make_head(model, tap=1), make_head(model, "mlp", tap=0)]
    proc = NadoLogitsProcessor(model, heads)
    assert hook_count(model) == before + 4  # one pre-hook on the decoder, one hook per tap
    proc.close()
    assert hook_count(model) == before
    proc.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        proc(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 10))
    with NadoLogitsProcessor(model, heads) as proc:
        greedy(model, tok, PROMPTS, [proc], new=2)
        assert hook_count(model) == before + 4
    assert hook_count(model) == before


@pytest.mark.parametrize(
    ("kind", "tap"),
    [("linear", FINAL), ("mlp", 0), ("transformer", 1), ("transformer", FINAL)],
)
def test_left_padded_batch_matches_single_rows(tiny, kind, tap):
    """Rows of unequal length batched (left-padded) get the guidance they get alone, within fp
    tolerance (different matmul shapes round differently): HF generate and attrctl's sampler."""
    model, tok = tiny.model, tiny.tokenizer
    head = make_head(model, kind, tap, random=True)
    seeds = [21, 22, 23]
    batch_seen = Record()
    with NadoLogitsProcessor(model, [head]) as proc:
        batch = greedy(model, tok, PROMPTS, [proc, batch_seen], new=5)
        batch_sampled = sample_continuations(model, tok, PROMPTS, seeds, max_new_tokens=6,
                                             logits_processor=proc)  # fmt: skip
        for i, prompt in enumerate(PROMPTS):
            seen = Record()
            alone = greedy(model, tok, [prompt], [proc, seen], new=5)[0]
            n = len(alone)  # a row may end early at a stop token
            assert torch.equal(batch[i, :n], alone), (kind, tap, i)
            for step in range(n):
                assert torch.allclose(batch_seen.scores[step][i], seen.scores[step][0], atol=1e-4)
            sampled = sample_continuations(model, tok, [prompt], seeds[i : i + 1],
                                           max_new_tokens=6, logits_processor=proc)  # fmt: skip
            assert sampled[0] == batch_sampled[i]
    unguided = greedy(model, tok, PROMPTS, new=5)
    assert not torch.equal(unguided, batch)  # the random head did steer


def test_transformer_head_needs_the_whole_sequence(tiny):
    """Called without having seen the prefill (or with a foreign input), a transformer head
    refuses instead of guessing."""
    model, tok = tiny.model, tiny.tokenizer
    head = make_head(model, "transformer", 1, random=True)
    with NadoLogitsProcessor(model, [head]) as proc:
        with pytest.raises(RuntimeError, match="no hidden state"):
            proc(torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, len(tok)))
        enc = tok(["Hello there"], return_tensors="pt")
        model(**enc)
        with pytest.raises(RuntimeError, match="every position"):
            proc(torch.zeros(1, 9, dtype=torch.long), torch.zeros(1, len(tok)))


# ------------------------------------------------------------------------------ attrctl generate
def test_generate_cli_plain(run_cli):
    code, out, err = run_cli("generate", "tiny-random", "Hello", "-n", "2", "--max-new-tokens",
                             "5", "--seed", "3")  # fmt: skip
    assert code == 0, err
    assert "sample 1/2" in out and "sample 2/2" in out and out.count("Hello") == 2
    again = run_cli("generate", "tiny-random", "Hello", "-n", "1", "--max-new-tokens", "5",
                    "--seed", "3")  # fmt: skip
    first = out.split("── sample 2/2")[0]
    assert again[1].splitlines()[1] == first.splitlines()[1]  # sample 1 does not depend on -n


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--guided"], "needs heads"), (["--temperature", "0"], "--temperature"),
     (["--top-p", "1.5"], "--top-p"), (["-n", "0"], "-n must be")],
)  # fmt: skip
def test_generate_cli_bad_input(run_cli, tmp_path, args, message):
    code, _, err = run_cli("generate", "tiny-random", "Hello", *args)
    assert code == 2 and message in err and "Traceback" not in err


def test_generate_cli_unfinished_run_is_refused(run_cli, tmp_path):
    (tmp_path / "run.json").write_text("{}")
    code, _, err = run_cli("generate", tmp_path, "Hello")
    assert code == 2 and "no finished model" in err
