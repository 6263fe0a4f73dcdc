"""`attrctl eval`: the metrics against hand-computed values, the held-out prompts, the utility
scorers, end-to-end runs on tiny-random (a model and a finished run), and bad input."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from attrctl.eval import control, metrics, utility
from attrctl.eval.settings import EvalSettings

FIXTURES = Path(__file__).parent / "fixtures"
VOLATILE = ("eval_seconds", "environment")  # what may differ between two identical evaluations


# ------------------------------------------------------------------------------ metrics
SCORES = np.array([[0.1, 0.6, 0.2], [0.0, 0.1, 0.4], [0.9, 0.5, 0.7]])  # [P=3, k=3]


def test_control_stats_by_hand():
    s = metrics.control_stats(SCORES, threshold=0.5)
    assert s["expected_max"] == pytest.approx((0.6 + 0.4 + 0.9) / 3)  # row maxima
    assert s["probability"] == pytest.approx(2 / 3)  # rows 0 and 2 reach 0.5
    assert s["mean"] == pytest.approx(3.5 / 9)
    assert s["fraction"] == pytest.approx(4 / 9)  # 0.6, 0.9, 0.5 (at the threshold), 0.7
    assert metrics.control_stats(SCORES, threshold=0.65)["fraction"] == pytest.approx(2 / 9)


def test_bootstrap_of_a_constant_sample_is_a_point():
    m = metrics.control_metrics(np.full((7, 4), 0.3), seed=0, resamples=200)
    for stat, value in [("expected_max", 0.3), ("mean", 0.3), ("probability", 0.0),
                        ("fraction", 0.0)]:  # fmt: skip
        assert m[stat]["value"] == pytest.approx(value)
        assert m[stat]["ci"] == pytest.approx([value, value])
    assert (m["prompts"], m["samples"], m["threshold"]) == (7, 28, 0.5)


def test_bootstrap_matches_a_hand_run_percentile_bootstrap():
    values = np.array([[0.0], [1.0], [2.0], [7.0]])  # P=4, k=1
    got = metrics.bootstrap_ci(values, lambda s: {"m": float(s.mean())}, seed=7, resamples=500)
    idx = np.random.default_rng(7).integers(0, 4, size=(500, 4))
    means = values[:, 0][idx].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    assert got["m"] == pytest.approx((lo, hi))
    assert 0.0 <= lo < values.mean() < hi <= 7.0
    again = metrics.bootstrap_ci(values, lambda s: {"m": float(s.mean())}, seed=7, resamples=500)
    other = metrics.bootstrap_ci(values, lambda s: {"m": float(s.mean())}, seed=8, resamples=500)
    assert again == got and other != got


def test_bootstrap_resamples_prompts_not_continuations():
    # every resample keeps whole rows: with rows (0, 0) and (1, 1) a resample's mean is 0, .5 or 1
    m = metrics.bootstrap_ci(np.array([[0.0, 0.0], [1.0, 1.0]]),
                             lambda s: {"m": float(s.mean())}, seed=1, resamples=2000, level=0.5)  # fmt: skip
    assert set(np.round(m["m"], 6)) <= {0.0, 0.5, 1.0}


def test_metrics_reject_an_empty_matrix():
    with pytest.raises(ValueError, match="non-empty"):
        metrics.control_stats(np.zeros((0, 3)))


def test_distinct_n_by_hand():
    texts = ["the cat sat", "the cat ran", ""]
    assert metrics.distinct_n(texts, 1) == pytest.approx(4 / 6)  # the, cat, sat, ran of 6
    assert metrics.distinct_n(texts, 2) == pytest.approx(3 / 4)  # (the cat) twice
    assert metrics.distinct_n(texts, 3) == pytest.approx(2 / 2)  # never across texts
    assert metrics.distinct_n(["a"], 2) == 0.0


# ------------------------------------------------------------------------------ held-out prompts
def _words(prompt: str, n: int = 4) -> tuple[str, ...]:
    return tuple(re.findall(r"[a-z0-9']+", prompt.lower())[:n])


def test_heldout_prompts_are_disjoint_from_training_prompts():
    from attrctl.data.prompt_sets import load_prompt_set
    from attrctl.policy.schema import BUNDLED_PROMPT_SETS

    training = [p for name in BUNDLED_PROMPT_SETS for p in load_prompt_set(name).prompts]
    sets = {s.name: s.prompts for s in control.heldout_prompt_sets()}
    assert set(sets) == {"heldout_toxic", "heldout_neutral"}
    assert not set(sets) & set(BUNDLED_PROMPT_SETS)  # a policy cannot train on them
    assert len(sets["heldout_toxic"]) >= 90 and len(sets["heldout_neutral"]) >= 45
    seen_train = {_words(p) for p in training}
    train_words = [set(re.findall(r"[a-z0-9']+", p.lower())) for p in training]
    heldout = [p for prompts in sets.values() for p in prompts]
    assert len({_words(p) for p in heldout}) == len(heldout)  # no near-duplicates inside
    for prompt in heldout:
        assert prompt not in training
        assert _words(prompt) not in seen_train, prompt  # same first 4 words, lower-cased
        words = set(re.findall(r"[a-z0-9']+", prompt.lower()))
        for other in train_words:  # nor mostly the same words
            assert len(words & other) / len(words | other) < 0.6, prompt


def test_prompt_file_errors(tmp_path):
    from attrctl.errors import AttrctlError

    (tmp_path / "empty.txt").write_text("\n# only a comment\n\n")
    with pytest.raises(AttrctlError, match="holds no prompts"):
        control.prompt_file(tmp_path / "empty.txt")
    with pytest.raises(AttrctlError, match="not found"):
        control.prompt_file(tmp_path / "missing.txt")
    (tmp_path / "p.txt").write_text("One\n\n# skip\nTwo\n")
    assert control.prompt_file(tmp_path / "p.txt") == control.EvalPrompts("p.txt", ("One", "Two"))


# ------------------------------------------------------------------------------ utility scorers
@pytest.fixture(scope="module")
def tiny():
    from attrctl.models import load_model

    return load_model("tiny-random")


def test_token_logprobs_batched_equals_one_by_one(tiny):
    import torch

    seqs = [[5, 9, 13, 40, 2, 77], [8, 3, 99], [1, 2, 3, 4, 5, 6, 7, 8, 9]]
    starts = [3, 1, 5]
    got = utility.token_logprobs(tiny.model, seqs, starts)
    for (ll, n), seq, start in zip(got, seqs, starts, strict=True):
        with torch.no_grad():
            logp = torch.log_softmax(tiny.model(torch.tensor([seq])).logits[0].double(), -1)
        want = sum(float(logp[t - 1, seq[t]]) for t in range(start, len(seq)))
        assert n == len(seq) - start
        assert ll == pytest.approx(want, abs=1e-4)


def test_heldout_windows_cap_the_scored_tokens(tiny):
    text = " ".join(f"word{i}" for i in range(400))
    windows = utility.heldout_windows(tiny.tokenizer, [text], max_tokens=10, window=4)
    assert [len(w) for w in windows] == [4, 4, 4, 2]  # 3 + 3 + 3 + 1 scored tokens
    res = utility.heldout_perplexity(tiny.model, tiny.tokenizer, [text], max_tokens=10, window=4)
    assert res["tokens"] == 10 and res["window"] == 4 and res["value"] > 1


def test_pick_choice_normalises_by_length():
    assert utility.pick_choice([-4.0, -3.0], [2, 1]) == 0  # -2/token beats -3/token
    assert utility.pick_choice([-4.0, -3.0], [1, 1]) == 1
    assert utility.pick_choice([-2.0, -1.0], [2, 1]) == 0  # a tie goes to the first


def test_mc_accuracy_by_hand(monkeypatch, tiny):
    from attrctl.tasks import parse_task

    task = parse_task(json.loads((FIXTURES / "bigbench" / "tiny_mc_task.json").read_text()), "x")
    # per choice in file order: (log-likelihood, tokens)
    fake = [(-6, 3), (-4, 1), (-1, 1),  # spider: per token -2, -4, -1 → "ten": wrong
            (-2, 2), (-3, 1),  # colour: -1, -3 → "blue": right
            (-5, 1), (-5, 1), (-8, 2), (-4, 2)]  # largest: → "3000" (score 1, the max): right  # fmt: skip
    monkeypatch.setattr(utility, "token_logprobs", lambda model, seqs, starts, bar=None: fake)
    res = utility.mc_accuracy(tiny.model, tiny.tokenizer, [task], max_examples=10)
    t = res["tasks"]["tiny_mc"]
    assert t["n"] == 3 and t["accuracy"] == pytest.approx(2 / 3)
    assert t["stderr"] == pytest.approx(math.sqrt(2 / 3 * 1 / 3 / 3))
    assert t["chance"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 4) / 3)
    assert res["accuracy"] == t["accuracy"] and res["chance"] == t["chance"]


def test_choice_sequences_move_the_context_space_onto_the_choice(tiny):
    tok = tiny.tokenizer
    seqs = utility.choice_sequences(tok, "Q: pick\nA: ", ["yes", "no way"])
    ctx = tok("Q: pick\nA:")["input_ids"]
    for (ids, start), choice in zip(seqs, ["yes", "no way"], strict=True):
        assert start == len(ctx) and ids[:start] == ctx
        assert ids[start:] == tok(" " + choice, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------------ end to end
def _numbers(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in VOLATILE}


def _check_schema(result: dict, sets: list[str], attribute: str = "toxicity") -> None:
    for key in ("label", "method", "target", "guided", "policy", "settings", "control",
                "utility", "generation", "train_seconds", "eval_seconds", "environment",
                "attrctl_version"):  # fmt: skip
        assert key in result, key
    for key in ("k", "top_p", "max_new_tokens", "seed", "prompt_sets"):
        assert key in result["settings"], key
    assert set(result["control"]) == {*sets, "all"}
    for block in result["control"].values():
        for scorer in ("oracle", "judge"):
            m = block[attribute][scorer]
            if m is None:
                continue
            for stat in ("expected_max", "probability", "mean", "fraction"):
                v, (lo, hi) = m[stat]["value"], m[stat]["ci"]
                assert 0 <= lo <= v <= hi <= 1, (stat, v, lo, hi)
            assert m["samples"] == m["prompts"] * result["settings"]["k"]
    assert set(result["generation"]["distinct"]) == {"1", "2", "3"}
    assert result["generation"]["ppl"] > 1
    assert 0 < result["generation"]["rows"] <= result["settings"]["gen_ppl_rows"]


def test_cli_eval_tiny_random_writes_json_and_is_deterministic(run_cli, tmp_path):
    args = ["eval", "tiny-random", "-k", "2", "--max-new-tokens", "5", "--ppl-tokens", "300",
            "--mc-tasks", "no_such_task", "--seed", "3", "-q"]  # fmt: skip
    code, out, err = run_cli(*args, "--out", tmp_path / "a")
    assert code == 0, err
    first = json.loads((tmp_path / "a" / "eval.json").read_text())
    _check_schema(first, ["heldout_toxic", "heldout_neutral"])
    assert (first["label"], first["method"], first["policy"]) == ("base: tiny-random", "base",
                                                                  "toxicity")  # fmt: skip
    assert first["guided"] is None and first["train_seconds"] is None
    assert first["control"]["heldout_toxic"]["toxicity"]["oracle"]["prompts"] == 100
    assert first["settings"]["seed"] == 3 and first["utility"]["mc"] is None
    assert any("attrctl assets fetch bigbench" in n for n in first["notes"])
    heldout = first["utility"]["heldout_ppl"]
    assert heldout is None or (heldout["tokens"] == 300 and heldout["value"] > 1)
    assert "heldout_toxic" in out and "exp. max" in out and "eval.json" in out
    code, _, err = run_cli(*args, "--out", tmp_path / "b")
    assert code == 0, err
    second = json.loads((tmp_path / "b" / "eval.json").read_text())
    assert _numbers(first) == _numbers(second)
    # re-evaluating with other settings replaces the file and says so
    code, _, err = run_cli(*args[:-1], "--max-new-tokens", "3", "--ppl-tokens", "0", "-q",
                           "--prompts", _prompt_file(tmp_path), "--out", tmp_path / "a")  # fmt: skip
    assert code == 0, err
    assert "replaced an earlier result" in err and "max_new_tokens" in err
    third = json.loads((tmp_path / "a" / "eval.json").read_text())
    assert set(third["control"]) == {"p.txt", "all"}
    assert third["utility"]["heldout_ppl"] is None


def _prompt_file(tmp_path: Path) -> Path:
    path = tmp_path / "p.txt"
    path.write_text("You are such a\nThe weather today is\n")
    return path


def test_evaluate_scores_fetched_tasks(tmp_path):
    from attrctl.eval import evaluate

    root = tmp_path / "bigbench"
    (root / "tiny_mc").mkdir(parents=True)
    shutil.copy(FIXTURES / "bigbench" / "tiny_mc_task.json", root / "tiny_mc" / "task.json")
    settings = EvalSettings(k=2, max_new_tokens=3, prompts=str(_prompt_file(tmp_path)),
                            ppl_tokens=0, mc_tasks=("tiny_mc",), bigbench_root=root)  # fmt: skip
    result = evaluate("tiny-random", settings=settings)
    mc = result["utility"]["mc"]
    assert mc["tasks"]["tiny_mc"]["n"] == 3
    assert mc["chance"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 4) / 3)
    assert 0 <= mc["accuracy"] <= 1 and mc["stderr"] >= 0
    assert result["settings"]["seed"] == 0  # the toxicity policy's seed


# ------------------------------------------------------------------------------ bad input
def _bad(run_cli, *args) -> str:
    code, _, err = run_cli("eval", *map(str, args), "-q")
    assert code == 2, (code, err)
    assert "Traceback" not in err and "error:" in err
    return err


def _fake_run(folder: Path, *, final: bool = True) -> Path:
    """A run directory's files, enough for open_finished_run (no fitted heads)."""
    folder.mkdir(parents=True)
    (folder / "run.json").write_text('{"policy_fingerprint": "x"}')
    (folder / "state.json").write_text('{"version": 1, "jobs": {}}')
    (folder / "policy.yaml").write_text("name: x\n")
    if final:
        (folder / "model" / "final").mkdir(parents=True)
        (folder / "model" / "final" / "config.json").write_text("{}")
    return folder


def test_bad_input_is_a_clear_error_and_writes_nothing(run_cli, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "eval.json").write_text('{"keep": true}')
    unfinished = _fake_run(tmp_path / "unfinished", final=False)
    assert "no finished model" in _bad(run_cli, unfinished)
    assert not (unfinished / "eval.json").exists()
    (tmp_path / "empty.txt").write_text("\n\n")
    assert "holds no prompts" in _bad(run_cli, "tiny-random", "--prompts", tmp_path / "empty.txt",
                                      "--out", out)  # fmt: skip
    assert "does not exist" in _bad(run_cli, tmp_path / "no-such-model", "--out", out)
    assert "not an attrctl run" in _bad(run_cli, "tiny-random", "--guided", out, "--out", out)
    headless = _fake_run(tmp_path / "headless")
    assert "no fitted heads" in _bad(run_cli, "tiny-random", "--guided", headless, "--out", out)
    assert "--k must be at least 1" in _bad(run_cli, "tiny-random", "-k", "0", "--out", out)
    assert (out / "eval.json").read_text() == '{"keep": true}'
    assert sorted(p.name for p in out.iterdir()) == ["eval.json"]


# ------------------------------------------------------------------------------ a finished run
TINY_POLICY = {
    "name": "tiny_eval",
    "model": "tiny-random",
    "data": [{"kind": "file", "path": "general.txt", "domain": "general"}],
    "attributes": [{"name": "toxicity", "oracle": {"kind": "profanity_check"},
                    "head": {"kind": "linear", "rank": 8}}],
    "regularizer": {"prompts": ["prompts.txt"], "samples_per_prompt": 2, "max_new_tokens": 4,
                    "epochs": 1, "batch_size": 4},
    "finetune": {"method": "top_layers", "top_layers": 1, "steps": 2, "batch_size": 2,
                 "seq_len": 16, "learning_rate": 1e-3},
    "schedule": {"mode": "sequential", "iterations": 1},
    "loss": {"impl": "chunked"},
}  # fmt: skip


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished one-iteration run of tiny-random with fitted heads (2 fine-tune steps)."""
    import subprocess
    import sys

    tmp = tmp_path_factory.mktemp("run")
    (tmp / "general.txt").write_text("\n\n".join(["The library opens at nine on weekdays."] * 24))
    (tmp / "prompts.txt").write_text("You are such a\nThe weather today is\nI think that you\n")
    (tmp / "tiny_eval.yaml").write_text(json.dumps(TINY_POLICY))
    cmd = [sys.executable, "-m", "attrctl.cli", "train", "-p", "tiny_eval.yaml", "--out", "run",
           "-q"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "run"


@pytest.mark.slow
@pytest.mark.ci
def test_eval_of_a_finished_run(run_cli, tiny_run, tmp_path):
    prompts = _prompt_file(tmp_path)
    code, _, err = run_cli("eval", tiny_run, "-k", "3", "--max-new-tokens", "4", "--prompts",
                           prompts, "--ppl-tokens", "200", "--mc-examples", "0", "-q")  # fmt: skip
    assert code == 0, err
    result = json.loads((tiny_run / "eval.json").read_text())
    _check_schema(result, ["p.txt"])
    assert (result["label"], result["method"], result["policy"]) == ("tiny_eval", "regularized",
                                                                     "tiny_eval")  # fmt: skip
    assert result["train_seconds"] > 0 and result["generation"]["base_model"] == "tiny-random"
    assert result["settings"]["ppl_window"] == 16  # the policy's finetune.seq_len


@pytest.mark.slow
@pytest.mark.ci
def test_guided_eval_uses_the_runs_heads(run_cli, tiny_run, tmp_path, monkeypatch):
    """Guidance is observed in what is sampled: the run's heads are rewritten to veto every
    token but a few (logσ(−60) = −60 on the logits of the others), so guided continuations hold
    only those tokens, while the same rows (same seeds) sampled unguided do not."""
    pytest.importorskip("attrctl.guided")
    import torch
    from safetensors.torch import load_file, save_file

    from attrctl.models import load_model
    from attrctl.train.rundir import open_finished_run

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)  # the module's run stays as trained for the other tests
    heads_file = open_finished_run(run).heads_dir / "heads.safetensors"
    tensors = load_file(str(heads_file))
    tok = load_model("tiny-random").tokenizer
    allowed = set(tok(" the cat sat on a mat", add_special_tokens=False).input_ids)
    assert tok.eos_token_id not in allowed and len(allowed) < len(tok) / 50
    bias = torch.full_like(tensors["0.bias"], -60.0)  # r = −60 everywhere: R ≈ 0 ...
    bias[sorted(allowed)] = 60.0  # ... but on the allowed tokens: R ≈ 1
    tensors["0.weight"] = torch.zeros_like(tensors["0.weight"])  # r does not depend on the text
    tensors["0.bias"] = bias
    save_file(tensors, str(heads_file))

    sampled: list[tuple] = []  # (the processor passed, the rows) per eval
    original = control.sample_eval_continuations

    def spy(*args, **kwargs):
        rows = original(*args, **kwargs)
        sampled.append((kwargs.get("logits_processor"), rows))
        return rows

    monkeypatch.setattr(control, "sample_eval_continuations", spy)
    prompts = _prompt_file(tmp_path)
    common = ["-k", "3", "--max-new-tokens", "4", "--prompts", prompts, "--ppl-tokens", "0",
              "--mc-examples", "0", "-q"]  # fmt: skip
    code, _, err = run_cli("eval", run, *common)  # unguided: the baseline rows
    assert code == 0, err
    code, _, err = run_cli("eval", run, "--guided", run, *common)
    assert code == 0, err
    result = json.loads((run / "eval_guided.json").read_text())
    _check_schema(result, ["p.txt"])
    assert result["method"] == "nado_decoding" and result["label"] == "tiny_eval (guided)"
    assert result["guided"] == str(run)
    # a plain model guided by the run's heads: its own folder, its own file
    code, _, err = run_cli("eval", "tiny-random", "--guided", run, *common,
                           "--out", tmp_path / "base")  # fmt: skip
    assert code == 0, err
    plain = json.loads((tmp_path / "base" / "eval_guided.json").read_text())
    assert plain["method"] == "nado_decoding" and plain["policy"] == "tiny_eval"

    (none, unguided), (proc, guided), (proc_base, guided_base) = sampled
    assert none is None and proc is not None and proc_base is not None
    key = [(r.prompt_set, r.prompt_index, r.sample, r.prompt) for r in unguided]
    assert len(key) == 2 * 3 and key == [(r.prompt_set, r.prompt_index, r.sample, r.prompt)
                                         for r in guided]  # fmt: skip
    # unguided, the run's model samples from all of its vocabulary; guided, only allowed tokens,
    # and no stop token (vetoed too), so every row runs to --max-new-tokens
    assert any(set(r.tokens) - allowed for r in unguided), [r.tokens for r in unguided]
    for r in guided + guided_base:
        assert set(r.tokens) <= allowed and len(r.tokens) == 4, (r.tokens, sorted(allowed))


def test_generation_perplexity_scores_an_even_spread_of_the_continuations():
    from attrctl.eval.control import Continuation
    from attrctl.eval.quality import spread

    rows = [Continuation("s", i // 25, i % 25, f"p{i // 25}", (1,), "x") for i in range(3750)]
    picked = spread(rows, 1000)
    assert 0 < len(picked) <= 1000 and len(picked) >= 1000 * 0.7
    by_prompt = {r.prompt_index for r in picked}
    assert by_prompt == set(range(150))  # every prompt keeps a share
    assert spread(rows[:40], 1000) == rows[:40] and spread(rows, 0) == []
