"""Regularizer heads: construction, taps, fitting on a controlled sample set, the fused KL a fitted
head drives, and saving/loading.

The fitting tests use a hand-made S_0 (no sampling): 200 continuations of 20 prompts, half
clearly toxic (insults, profanity) and half neutral, scored by the policy's own oracle
(profanity_check), fitted with ``fit_job`` on the tiny-random model. The checks that the head
learned something are made twice: by ``fit_job``'s AUC on held-out prompts, and by an AUC
computed here from the head's tensors on texts and prompts the fit never saw. The KL checks
compare the chunked and eager losses with each other and with a full-logit float64 computation
written here.

Run with ``-s`` to see the measured AUCs and KL values.
"""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from attrctl.errors import AttrctlError
from attrctl.heads import FINAL, RegularizerHead, build_heads, default_tap, forward_with_tap
from attrctl.heads_io import load_heads, save_heads
from attrctl.losses import regularized_lm_loss
from attrctl.policy import compile_policy, load_policy
from attrctl.policy.schema import FineTune, HeadSpec
from attrctl.train.context import TrainContext
from attrctl.train.fit import auc, fit_job
from attrctl.train.rundir import RunDir
from attrctl.train.sample import sample_stats

N_LAYERS = 2  # tiny-random: a 2-layer Llama, hidden 64
HIDDEN = 64

# ----------------------------------------------------------------------------- sample texts
OPENERS = ["you", "shut up you", "listen you", "go away you", "get lost you", "fuck off you",
           "screw you, you"]  # fmt: skip
INSULT_ADJ = ["stupid", "dumb", "pathetic", "worthless", "ugly", "fat", "brainless"]
INSULT_NOUN = ["idiot", "moron", "bitch", "bastard", "asshole", "loser", "jerk"]
SUBJECTS = ["the farmer", "my sister", "the old teacher", "our neighbour", "the children",
            "a young doctor"]  # fmt: skip
VERBS = ["planted", "painted", "visited", "cleaned", "repaired", "described"]
OBJECTS = ["the garden fence", "a small boat", "the city library", "the kitchen table",
           "a blue bicycle", "the village church"]  # fmt: skip
# 20 prompts: fit_job holds out 10% of the prompts (2, with all 10 samples of each) once a run
# has at least 10
TRAIN_PROMPTS = [f"{who} {how}:" for who in ("She", "Then the man", "Her brother", "The stranger")
                 for how in ("said", "wrote back", "shouted", "whispered", "replied")]  # fmt: skip
FRESH_PROMPTS = ["The reply came at once:", "Someone in the crowd yelled:"]  # never fitted on
N_TRAIN, N_FRESH = 100, 40  # per class


def _texts():
    """Disjoint toxic/neutral continuations for S_0 and for the fresh held-out set."""
    rng = random.Random(0)
    tox = sorted({f"{o} {a} {n}" for o in OPENERS for a in INSULT_ADJ for n in INSULT_NOUN})
    neu = sorted({f"{s} {v} {o}" for s in SUBJECTS for v in VERBS for o in OBJECTS})
    rng.shuffle(tox)
    rng.shuffle(neu)
    return (tox[:N_TRAIN], neu[:N_TRAIN]), (tox[N_TRAIN : N_TRAIN + N_FRESH],
                                            neu[N_TRAIN : N_TRAIN + N_FRESH])  # fmt: skip


def write_policy(folder: Path, *, head: str = "{kind: linear}",
                 oracle: str = "{kind: profanity_check}", finetune: str | None = None,
                 regularizer: str = "{epochs: 6, learning_rate: 0.01, batch_size: 32}",
                 names: tuple[str, ...] = ("toxicity",)) -> Path:  # fmt: skip
    """A tiny-random policy with a `file` data source (no synthesis), written as YAML text."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "corpus.txt").write_text("The sun rose over the hills.\n\nIt was a calm day.\n")
    finetune = finetune or f"{{method: top_layers, top_layers: {N_LAYERS - 1}}}"
    path = folder / "policy.yaml"
    attrs = [f"  - {{name: {n}, oracle: {oracle}, head: {head}}}" for n in names]
    lines = ["name: heads-test", "model: tiny-random", "data:",
             "  - {kind: file, path: corpus.txt, domain: general}", "attributes:", *attrs,
             f"regularizer: {regularizer}", f"finetune: {finetune}", "loss: {impl: chunked}",
             f"output_dir: {folder / 'run'}", "seed: 0"]  # fmt: skip
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors on a shared 2-core machine: one torch thread is faster than contending."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny():
    from attrctl.models import load_model

    loaded = load_model("tiny-random")
    assert loaded.model.config.num_hidden_layers == N_LAYERS
    return loaded


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, tiny):
    """S_0 written and published in a run directory, then R_1 fitted on it with fit_job."""
    folder = tmp_path_factory.mktemp("fit")
    compiled = compile_policy(load_policy(write_policy(folder)))
    oracle = compiled.attributes[0].oracle
    (tox, neu), fresh = _texts()
    texts = tox + neu
    scores = np.asarray(oracle.score(texts), dtype=float)
    # the controlled set must really be two classes under the training oracle
    assert scores[:N_TRAIN].min() >= 0.5 > scores[N_TRAIN:].max(), scores
    rows = []
    for k, (text, score) in enumerate(zip(texts, scores, strict=True)):
        p = k % len(TRAIN_PROMPTS)
        rows.append({"prompt_set": "mixed", "prompt_index": p, "sample": k,
                     "prompt": TRAIN_PROMPTS[p], "continuation": " " + text,
                     "scores": {"toxicity": round(float(score), 6)}})  # fmt: skip
    run = RunDir(folder / "run")
    run.samples(0).parent.mkdir(parents=True, exist_ok=True)
    run.samples(0).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    run.publish("sample/0", {"iteration": 0, "rows": len(rows), "source": "test"})
    ctx = TrainContext(compiled, run)
    record = fit_job(ctx, 1, 0)
    heads = load_heads(compiled, tiny.model, run.heads(1))
    return SimpleNamespace(compiled=compiled, run=run, ctx=ctx, record=record, rows=rows,
                           heads=heads, fresh=fresh, oracle=oracle)  # fmt: skip


def _batch(tok, prompts: list[str], continuations: list[str]):
    """Right-padded ``[B, T]`` ids, attention mask, and each row's (prompt length, length)."""
    seqs = []
    for prompt, cont in zip(prompts, continuations, strict=True):
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        c = tok(cont, add_special_tokens=False)["input_ids"]
        seqs.append((p + c, len(p)))
    t = max(len(s) for s, _ in seqs)
    ids = torch.zeros(len(seqs), t, dtype=torch.long)
    mask = torch.zeros(len(seqs), t, dtype=torch.long)
    for j, (s, _) in enumerate(seqs):
        ids[j, : len(s)] = torch.tensor(s)
        mask[j, : len(s)] = 1
    return ids, mask, [(plen, len(s)) for s, plen in seqs]


# ----------------------------------------------------------------------------- fitting: AUC
def test_fit_job_separates_toxic_from_neutral_on_held_out(fitted):
    rec = fitted.record
    assert rec["fitted"] is True and rec["samples"] == 0 and rec["epochs"] == 6
    m = rec["heads"]["toxicity"]
    print(f"\nfit_job held-out: auc={m['auc']:.4f} accuracy={m['accuracy']:.3f} "
          f"bce={m['bce']:.4f} n={m['held_out']} train_loss={rec['train_loss']}")  # fmt: skip
    # split by prompt: 2 of the 20 prompts held out, with all of their 10 samples each
    assert m["held_out_prompts"] == rec["held_out"]["prompts"] == 2
    assert m["held_out"] == rec["held_out"]["sequences"] == 20
    # both classes among the held-out rows (else the AUC would be NaN)
    assert 0 < m["positive_rate"] < 1
    assert m["auc"] >= 0.8, f"held-out AUC {m['auc']:.4f} < 0.8"
    assert m["accuracy"] >= 0.8, f"held-out accuracy {m['accuracy']:.3f}"
    assert m["bce"] < math.log(2)  # better than the zero head's σ(0) = ½ everywhere
    assert rec["train_loss"][-1] < rec["train_loss"][0] - 0.1  # the fit moved
    # the saved R_1 carries the record it was fitted with
    saved = json.loads((fitted.run.heads(1) / "heads.json").read_text())
    assert saved["heads"]["toxicity"]["auc"] == m["auc"]


def _r_last(model, tok, head, prompts: list[str], continuations: list[str]) -> np.ndarray:
    """R(x) = σ(r_{T−1}[x_T]) per text: the head's estimate at the row predicting the last token."""
    ids, mask, spans = _batch(tok, prompts, continuations)
    with torch.no_grad():
        _, taps = forward_with_tap(model, [head.tap], ids, mask)
        feats = head.features(taps[head.tap])  # [B, T, Hk]
    out = []
    for j, (_, n) in enumerate(spans):
        last = ids[j, n - 1]
        out.append(float(torch.sigmoid(feats[j, n - 2] @ head.weight[last] + head.bias[last])))
    return np.array(out)


def test_fitted_head_ranks_fresh_texts_it_never_saw(fitted, tiny):
    head = fitted.heads[0]
    assert head.tap == N_LAYERS - 1  # top_layers: 1 → reads the last frozen layer
    train = {r["continuation"].strip() for r in fitted.rows}
    fresh_tox, fresh_neu = fitted.fresh
    assert not train & (set(fresh_tox) | set(fresh_neu))
    scores = fitted.oracle.score(fresh_tox + fresh_neu)
    assert min(scores[:N_FRESH]) >= 0.5 > max(scores[N_FRESH:])
    texts = fresh_tox + fresh_neu
    prompts = [FRESH_PROMPTS[k % 2] for k in range(len(texts))]
    r = _r_last(tiny.model, tiny.tokenizer, head, prompts, [" " + t for t in texts])
    r_tox, r_neu = r[:N_FRESH], r[N_FRESH:]
    # positive = satisfies the attribute (non-toxic); AUC by pair counting, not by auc()
    wins, ties = r_neu[:, None] > r_tox[None, :], r_neu[:, None] == r_tox[None, :]
    pairs = wins.mean() + 0.5 * ties.mean()
    print(f"\nfresh held-out ({2 * N_FRESH} texts, unseen prompts): auc={pairs:.4f} "
          f"mean R toxic={r_tox.mean():.3f} neutral={r_neu.mean():.3f}")  # fmt: skip
    assert pairs >= 0.8, f"fresh held-out AUC {pairs:.4f} < 0.8"
    assert r_tox.mean() < 0.5 < r_neu.mean()


# ----------------------------------------------------------------------------- fitting: KL
def _kl_case(model, tok, head, texts, impl, head_override=None):
    """Per-token KL(q‖p) of regularized_lm_loss over the continuation tokens of the texts, and
    the same from full logits in float64 (written here from docs/design.md, "The method")."""
    lm_w = model.get_output_embeddings().weight.detach()
    prompts = [FRESH_PROMPTS[k % 2] for k in range(len(texts))]
    ids, mask, spans = _batch(tok, prompts, [" " + t for t in texts])
    scored = torch.zeros(ids.shape[0], ids.shape[1] - 1, dtype=torch.bool)  # row t predicts t+1
    for j, (plen, n) in enumerate(spans):
        scored[j, plen - 1 : n - 1] = True  # continuation tokens only
    with torch.no_grad():
        hidden, taps = forward_with_tap(model, [head.tap], ids, mask)
        h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        rh = (head_override or head).reg_head(taps[head.tap][:, :-1])
        labels = torch.where(scored, ids[:, 1:], torch.full_like(ids[:, 1:], -100)).reshape(-1)
        out = regularized_lm_loss(h, lm_w, labels, [rh], lam=1.0, reduction="none", impl=impl)
        keep = scored.reshape(-1)
        ell = (h[keep] @ lm_w.t()).double()
        r = (rh.states[keep] @ rh.weight.t() + rh.bias).double()
        log_p = torch.log_softmax(ell, -1)
        log_q = torch.log_softmax(ell + F.logsigmoid(r), -1)
        ref = (log_q.exp() * (log_q - log_p)).sum(-1)
    assert not out.kl[~keep].any()  # ignored rows carry no KL
    return out.kl[keep], ref


def test_fitted_head_gives_kl_on_toxic_tokens_and_flat_head_none(fitted, tiny):
    model, tok, head = tiny.model, tiny.tokenizer, fitted.heads[0]
    fresh_tox, fresh_neu = fitted.fresh
    kl = {}
    for impl in ("chunked", "eager"):
        for name, texts in (("toxic", fresh_tox), ("neutral", fresh_neu)):
            got, ref = _kl_case(model, tok, head, texts, impl)
            torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-4)
            kl[impl, name] = got
    for name in ("toxic", "neutral"):
        torch.testing.assert_close(kl["chunked", name], kl["eager", name], atol=1e-5, rtol=1e-4)
    tox, neu = kl["chunked", "toxic"], kl["chunked", "neutral"]
    print(f"\nfitted head, fused KL per token: toxic mean={tox.mean():.3e} min={tox.min():.3e} "
          f"(n={tox.numel()}); neutral mean={neu.mean():.3e} (n={neu.numel()}); "
          f"eager toxic mean={kl['eager', 'toxic'].mean():.3e}")  # fmt: skip
    assert tox.mean() > 1e-4 and bool((tox > 0).all())
    assert tox.mean() > neu.mean()

    # R flat over the vocabulary → q = p → KL ~0 on every token, toxic text or not:
    # (a) weight 0 and a constant bias; (b) identical weight rows, so r_t varies with the position
    # but not with the token
    v, k = head.weight.shape
    g = torch.Generator().manual_seed(3)
    flat_const = RegularizerHead(head.spec, model, head.tap).eval()
    flat_rows = RegularizerHead(head.spec, model, head.tap).eval()
    with torch.no_grad():
        flat_const.load_state_dict(head.state_dict())
        flat_const.weight.zero_()
        flat_const.bias.fill_(1.7)
        flat_rows.load_state_dict(head.state_dict())
        flat_rows.weight.copy_(torch.randn(1, k, generator=g).expand(v, k))
        flat_rows.bias.fill_(-0.4)
    for flat in (flat_const, flat_rows):
        for impl in ("chunked", "eager"):
            got, ref = _kl_case(model, tok, head, fresh_tox, impl, head_override=flat)
            assert got.abs().max() < 1e-6, (impl, got.abs().max())
            assert ref.abs().max() < 1e-9  # the float64 reference agrees it is flat
    print(f"flat heads: max |KL| chunked={got.abs().max():.2e}")


# ----------------------------------------------------------------------------- fit_job, misc
def test_fit_job_without_samples_saves_the_zero_head(fitted, tiny):
    rec = fit_job(fitted.ctx, 7, None)
    assert rec["fitted"] is False
    heads = load_heads(fitted.compiled, tiny.model, fitted.run.heads(7))
    assert not heads[0].weight.any() and not heads[0].bias.any()
    assert json.loads((fitted.run.heads(7) / "heads.json").read_text())["fitted"] is False


def test_sample_stats_counts_violations_per_set(fitted):
    rows = [
        {"prompt_set": "a", "continuation": "fuck off you stupid idiot", "scores": {"toxicity": 0.99}},
        {"prompt_set": "a", "continuation": "shut up you dumb bitch", "scores": {"toxicity": 0.5}},
        {"prompt_set": "a", "continuation": "the farmer planted the garden fence",
         "scores": {"toxicity": 0.49}},
        {"prompt_set": "a", "continuation": "my sister visited the city library",
         "scores": {"toxicity": 0.01}},
        {"prompt_set": "b", "continuation": "you worthless moron", "scores": {"toxicity": 0.8}},
        {"prompt_set": "b", "continuation": "the children painted a small boat",
         "scores": {"toxicity": 0.1}},
    ]  # fmt: skip
    stats = sample_stats(fitted.ctx, rows)
    # max_violation 0.5: a score of exactly 0.5 is a violation ("at or above")
    assert stats["violation_rate"] == {"toxicity": pytest.approx(3 / 6)}
    assert stats["by_prompt_set"]["a"]["toxicity"] == pytest.approx(2 / 4)
    assert stats["by_prompt_set"]["b"]["toxicity"] == pytest.approx(1 / 2)
    if "judge_violation_rate" in stats:  # the independent judge is installed
        assert stats["judge_violation_rate"] == pytest.approx(3 / 6)
        assert stats["by_prompt_set"]["b"]["judge"] == pytest.approx(1 / 2)


def test_auc_matches_pair_counting_with_ties():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 60).astype(float)  # many ties
    positive = rng.random(60) < 0.4
    assert auc(scores, positive) == pytest.approx(roc_auc_score(positive, scores), abs=1e-12)
    assert auc([0.1, 0.2, 0.9], [False, False, True]) == 1.0
    assert auc([0.9, 0.2, 0.1], [True, False, False]) == 1.0
    assert auc([0.1, 0.2, 0.9], [True, True, False]) == 0.0
    assert auc([0.3, 0.3], [True, False]) == 0.5
    assert math.isnan(auc([0.1, 0.2], [True, True]))


# ----------------------------------------------------------------------------- construction
KINDS = ["linear", "mlp", "transformer"]


@pytest.mark.parametrize("rank", [None, 8])
@pytest.mark.parametrize("kind", KINDS)
def test_every_head_starts_at_zero_and_gives_zero_kl(tiny, kind, rank):
    model, v = tiny.model, len(tiny.tokenizer)
    spec = HeadSpec(kind=kind, rank=rank, hidden_size=32)
    ft = FineTune(method="top_layers", top_layers=1)
    torch.manual_seed(0)
    (head,) = build_heads([spec], model, ft)
    width = {"linear": HIDDEN, "mlp": 32, "transformer": HIDDEN}[kind]
    assert tuple(head.weight.shape) == (v, rank or width) and tuple(head.bias.shape) == (v,)
    ids = torch.randint(1, v, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hidden, taps = forward_with_tap(model, [head.tap], ids)
        logits = head.logits(taps[head.tap])
        assert logits.shape == (2, 9, v)
        assert torch.count_nonzero(logits) == 0  # σ(0) = ½ everywhere
        feats = head.features(taps[head.tap])
        assert feats.shape == (2, 9, rank or width) and feats.abs().sum() > 0  # a real body
        labels = ids[:, 1:].reshape(-1)
        h = hidden[:, :-1].reshape(-1, HIDDEN)
        lm_w = model.get_output_embeddings().weight
        plain = regularized_lm_loss(h, lm_w, labels, [], lam=1.0, reduction="none", impl="eager")
        for impl in ("chunked", "eager"):
            out = regularized_lm_loss(h, lm_w, labels, [head.reg_head(taps[head.tap][:, :-1])],
                                      lam=1.0, reduction="none", impl=impl)  # fmt: skip
            assert torch.count_nonzero(out.kl) == 0, (impl, out.kl.abs().max())  # q = p exactly
            torch.testing.assert_close(out.loss, plain.loss, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    ("spec", "ft", "want"),
    [
        (HeadSpec(), FineTune(method="top_layers", top_layers=1), N_LAYERS - 1),
        (HeadSpec(), FineTune(method="top_layers", top_layers=2), 0),
        (HeadSpec(), FineTune(method="full"), FINAL),
        (HeadSpec(), FineTune(method="lora"), FINAL),
        (HeadSpec(layer=2), FineTune(method="top_layers", top_layers=1), 2),
        (HeadSpec(layer=0), FineTune(method="full"), 0),
        (HeadSpec(layer=1), FineTune(method="lora"), 1),
    ],
)
def test_default_tap(spec, ft, want):
    assert default_tap(spec, ft, N_LAYERS) == want


def test_layer_past_the_model_is_refused(tiny):
    with pytest.raises(AttrctlError, match=r"head\.layer 3"):
        default_tap(HeadSpec(layer=3), FineTune(method="full"), N_LAYERS)
    with pytest.raises(AttrctlError, match=r"head\.layer 3"):
        build_heads([HeadSpec(layer=3)], tiny.model, FineTune(method="full"))
    with pytest.raises(ValidationError):
        HeadSpec(layer=-1)


def test_taps_are_the_models_hidden_states(tiny):
    model = tiny.model
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, len(tiny.tokenizer), (2, 7), generator=g)
    taps_all = [*range(N_LAYERS + 1), FINAL]
    with torch.no_grad():
        ref = model(input_ids=ids, output_hidden_states=True)
        hidden, taps = forward_with_tap(model, taps_all, ids)
    hs = ref.hidden_states
    assert len(hs) == N_LAYERS + 1
    # hidden_states[i] is the output of layer i (0 = embeddings); transformers stores the final
    # *normed* state as the last entry, which is FINAL; tap N_LAYERS is the last layer's raw output
    for i in range(N_LAYERS):
        torch.testing.assert_close(taps[i], hs[i], atol=0, rtol=0)
    torch.testing.assert_close(taps[FINAL], hs[-1], atol=0, rtol=0)
    torch.testing.assert_close(hidden, hs[-1], atol=0, rtol=0)
    assert not torch.equal(taps[N_LAYERS], hs[-1])
    norm = model.get_decoder().norm
    torch.testing.assert_close(norm(taps[N_LAYERS]), hs[-1], atol=1e-6, rtol=1e-6)
    # the LM head on the final state gives the model's logits
    lm_w = model.get_output_embeddings().weight
    torch.testing.assert_close(hidden @ lm_w.t(), ref.logits, atol=1e-5, rtol=1e-5)

    # right padding (how fit batches are built) leaves every real position's taps unchanged
    short = ids[1, :4]
    padded = torch.stack([ids[0], torch.cat([short, short.new_zeros(3)])])
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    with torch.no_grad():
        _, taps_p = forward_with_tap(model, taps_all, padded, mask)
        _, taps_s = forward_with_tap(model, taps_all, short[None])
    for t in taps_all:
        torch.testing.assert_close(taps_p[t][1, :4], taps_s[t][0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(taps_p[t][0], taps[t][0], atol=1e-5, rtol=1e-5)


def test_transformer_body_copies_the_layers_above_the_tap(tiny):
    model = tiny.model
    layers = model.get_decoder().layers
    q = lambda layer: layer.self_attn.q_proj.weight  # noqa: E731
    assert not torch.equal(q(layers[0]), q(layers[1]))  # else the check below is vacuous
    ft = FineTune(method="top_layers", top_layers=1)
    ids = torch.randint(1, len(tiny.tokenizer), (2, 8), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        hidden, taps = forward_with_tap(model, [0, 1], ids)
    cases = [(HeadSpec(kind="transformer", layer=1, num_layers=1), 1, [1]),
             (HeadSpec(kind="transformer", layer=0, num_layers=2), 0, [0, 1])]  # fmt: skip
    for spec, tap, above in cases:
        (head,) = build_heads([spec], model, ft)
        assert head.tap == tap and len(head.body.layers) == len(above)
        for copied, i in zip(head.body.layers, above, strict=True):
            assert torch.equal(q(copied), q(layers[i]))
            assert q(copied).data_ptr() != q(layers[i]).data_ptr()  # a copy, not the LLM's own
        # the copied layers + norm reproduce the LLM's top from the tap (same mask, positions)
        with torch.no_grad():
            out = head.body(taps[tap])
        torch.testing.assert_close(out, hidden, atol=1e-5, rtol=1e-5)
    # at the top of the stack (FINAL tap) there is nothing above: the top layer is copied
    (head,) = build_heads([HeadSpec(kind="transformer", num_layers=1)], model,
                          FineTune(method="full"))  # fmt: skip
    assert head.tap == FINAL and torch.equal(q(head.body.layers[0]), q(layers[-1]))


@pytest.mark.parametrize("kind", KINDS)
def test_head_gradients_stop_at_the_tap(tiny, kind):
    from attrctl.models import load_model

    model = load_model("tiny-random").model  # own copy: its .grad fields are inspected
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(True)
    (head,) = build_heads([HeadSpec(kind=kind, rank=8, hidden_size=16)], model,
                          FineTune(method="top_layers", top_layers=1))  # fmt: skip
    opt = torch.optim.SGD(head.parameters(), lr=0.5)
    ids = torch.randint(1, len(tiny.tokenizer), (2, 6), generator=torch.Generator().manual_seed(5))
    for _ in range(2):  # the second step has a non-zero projection, so the body gets gradient
        hidden, taps = forward_with_tap(model, [head.tap], ids)
        assert hidden.requires_grad and not taps[head.tap].requires_grad
        loss = -F.logsigmoid(head.logits(taps[head.tap])[..., :50]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(p.grad is None for p in model.parameters())
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    body = [*head.body.parameters(), *head.down.parameters()]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in body)
    for n, p in model.named_parameters():  # the head trained; the LLM did not move
        assert torch.equal(p, before[n]), n


# ----------------------------------------------------------------------------- save / load
def _compiled(folder: Path, head: str, names: tuple[str, ...] = ("toxicity",)):
    return compile_policy(load_policy(write_policy(
        folder, head=head, oracle="{kind: regex, patterns: ['idiot']}", names=names)))  # fmt: skip


@pytest.mark.parametrize(
    "head",
    ["{kind: mlp, rank: 8, hidden_size: 16}", "{kind: transformer, rank: null}", "{kind: linear}"],
)
def test_heads_round_trip_bit_exact(tmp_path, tiny, head):
    compiled = _compiled(tmp_path / "p", head)
    heads = load_heads(compiled, tiny.model, None)
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for p in heads.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    folder = tmp_path / "heads"
    save_heads(heads, folder, {"note": "round trip", "auc": 0.5})
    loaded = load_heads(compiled, tiny.model, folder)
    a, b = heads.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [h.tap for h in loaded] == [h.tap for h in heads]
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert json.loads((folder / "heads.json").read_text()) == {"note": "round trip", "auc": 0.5}
    x = torch.randn(1, 5, HIDDEN, generator=g)
    with torch.no_grad():
        assert torch.equal(heads[0].logits(x), loaded[0].logits(x))


def test_heads_of_another_spec_are_refused_naming_the_file(tmp_path, tiny):
    src = _compiled(tmp_path / "r8", "{kind: linear, rank: 8}")
    folder = tmp_path / "heads"
    save_heads(load_heads(src, tiny.model, None), folder, {})
    file = str(folder / "heads.safetensors")
    for n, other in enumerate(["{kind: linear, rank: 16}", "{kind: mlp, rank: 8}"]):
        dst = _compiled(tmp_path / f"other{n}", other)
        with pytest.raises(AttrctlError) as err:
            load_heads(dst, tiny.model, folder)
        assert file in str(err.value) and "head 0" in str(err.value)
        if n == 0:  # the message says which tensor and both shapes (rank 8 saved, 16 wanted)
            assert re.search(r"has shape \[\d+, 8\], this model needs \[\d+, 16\]", str(err.value))
        else:  # an mlp body the linear head never had
            assert "is missing" in str(err.value)
    with pytest.raises(AttrctlError, match="missing"):
        load_heads(src, tiny.model, tmp_path / "nowhere")
    (folder / "heads.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(AttrctlError, match="corrupt"):
        load_heads(src, tiny.model, folder)


def test_heads_file_with_more_heads_than_the_policy_is_refused(tmp_path, tiny):
    two = _compiled(tmp_path / "two", "{kind: linear, rank: 8}", names=("toxicity", "insult"))
    one = _compiled(tmp_path / "one", "{kind: linear, rank: 8}")
    folder = tmp_path / "heads"
    save_heads(load_heads(two, tiny.model, None), folder, {})
    with pytest.raises(AttrctlError, match=r"heads\.safetensors"):
        load_heads(one, tiny.model, folder)
