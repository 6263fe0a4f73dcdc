"""The paper's baselines as `finetune.objective`: sft, filter and rl (TRL), plus the shipped
baseline policies. Training runs are real `attrctl train` processes on tiny-random (see
tests/test_train.py for the helpers and why they run with one thread)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_train import PROMPTS, attrctl, write_policy

from attrctl.data import build_mixture
from attrctl.errors import PolicyError
from attrctl.policy import load_policy
from attrctl.policy.load import validate_policy
from attrctl.policy.schema import Policy
from attrctl.policy.show import resolved_dict

POLICIES = Path(__file__).resolve().parents[1] / "policies"
BASELINES = ("toxicity_sft", "toxicity_filter", "toxicity_rl", "toxicity_uniform")


def _jobs(run: Path) -> dict:
    return json.loads((run / "state.json").read_text())["jobs"]


def _records(run: Path, kind: str) -> list[dict]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if r.get("kind") == kind]


# ------------------------------------------------------------------------------ schema
def test_objective_rejects_unknown_values_naming_field_and_choices(tmp_path, minimal_policy):
    bad = minimal_policy | {"finetune": {"objective": "ppo"}}
    with pytest.raises(PolicyError) as err:
        validate_policy(bad, source=tmp_path / "p.yaml")
    msg = str(err.value)
    assert "finetune.objective" in msg
    for choice in ("regularized", "sft", "filter", "rl"):
        assert choice in msg
    assert validate_policy(minimal_policy, source=tmp_path / "p.yaml").finetune.objective == (
        "regularized"
    )


def test_rl_batch_must_hold_whole_groups(tmp_path, minimal_policy):
    bad = minimal_policy | {
        "finetune": {"objective": "rl", "batch_size": 6, "rl": {"num_generations": 4}}
    }
    with pytest.raises(PolicyError, match=r"multiple of rl\.num_generations"):
        validate_policy(bad, source=tmp_path / "p.yaml")
    ok = minimal_policy | {"finetune": {"objective": "rl", "batch_size": 6, "grad_accum": 2}}
    assert validate_policy(ok, source=tmp_path / "p.yaml").finetune.rl.num_generations == 4


def test_new_fields_stay_out_of_a_regularized_runs_fingerprint():
    """Runs made before `finetune.objective` existed still resume (same fingerprint)."""
    from attrctl.train.schedules import fingerprint_text

    text = fingerprint_text(load_policy("toxicity"))
    assert "objective" not in text and "num_generations" not in text
    rl = fingerprint_text(load_policy("toxicity_rl"))
    assert "objective: rl" in rl and "num_generations" in rl


# ------------------------------------------------------------------------------ shipped policies
@pytest.mark.parametrize("name", BASELINES)
def test_baseline_policies_share_data_seed_and_budget_with_the_default(name):
    """Each row of the table differs from policies/toxicity.yaml only where its method does."""
    ours, other = resolved_dict(load_policy("toxicity")), resolved_dict(load_policy(name))
    for d in (ours, other):
        for key in ("name", "description"):
            d.pop(key)
        d["finetune"].pop("rl")  # only the rl objective reads it
    # all rows train on the default run's synthesized rows
    assert other["data"][0].pop("path") == "runs/toxicity/data/synth.jsonl"
    assert ours["data"][0].pop("path") is None  # default: runs/toxicity/data/synth.jsonl
    if name == "toxicity_uniform":
        theirs, mine = other.pop("regularization"), ours.pop("regularization")
        assert theirs.pop("own_samples") == mine.pop("own_samples")  # the same own-sample term
        assert theirs == {"lam": 10.0, "per_domain": {}, "auto_max": 10.0}
    else:
        assert other["finetune"].pop("objective") == name.split("_")[1]
        ours["finetune"].pop("objective")
    assert other == ours


# ------------------------------------------------------------------------------ filter (data)
def _synth_policy(tmp_path: Path, rows: list[dict], objective: str) -> Policy:
    path = tmp_path / "synth.jsonl"
    keys = [{"prompt_set": "toxic", "prompt_index": i, "sample": 0} for i in range(len(rows))]
    path.write_text("".join(json.dumps(k | r) + "\n" for k, r in zip(keys, rows, strict=True)))
    raw = {
        "name": "f",
        "model": "tiny-random",
        "data": [
            {"kind": "synth", "domain": "toxic", "path": str(path)},
            {"kind": "file", "domain": "general", "path": "general.txt"},
        ],
        "attributes": [
            {"name": "tox", "oracle": {"kind": "lexicon", "words": ["idiot"]}},
            {"name": "pii", "oracle": {"kind": "regex", "patterns": ["@"]},
             "target": {"max_violation": 0.8}},
        ],
        "finetune": {"objective": objective},
        "output_dir": str(tmp_path / "run"),
    }  # fmt: skip
    (tmp_path / "general.txt").write_text("one\n\ntwo\n\nthree\n")
    return Policy.model_validate(raw, context={"base_dir": tmp_path})


def test_filter_drops_exactly_the_rows_any_oracle_flags(tmp_path):
    scores = [  # (tox, pii): flagged when tox ≥ 0.5 or pii ≥ 0.8, ties included
        (0.1, 0.0), (0.5, 0.0), (0.49, 0.79), (0.0, 0.8), (0.9, 0.9), (0.2, 0.1),
    ]  # fmt: skip
    rows = [
        {"prompt": f"p{i} ", "continuation": f"c{i}", "scores": {"tox": t, "pii": p}}
        for i, (t, p) in enumerate(scores)
    ]
    mix = build_mixture(_synth_policy(tmp_path, rows, "filter"))
    synth = mix.sources[0]
    assert [e.text for e in synth.examples] == ["p0 c0", "p2 c2", "p5 c5"]
    assert synth.dropped == 3 and mix.sources[1].dropped == 0
    assert mix.summary()[0]["dropped"] == 3
    for objective in ("sft", "regularized", "rl"):  # only `filter` filters
        mix = build_mixture(_synth_policy(tmp_path, rows, objective))
        assert len(mix.sources[0].examples) == 6 and mix.sources[0].dropped == 0


def test_filter_that_drops_every_row_is_a_clear_error(tmp_path):
    from attrctl.errors import AttrctlError

    rows = [{"prompt": "a", "continuation": "b", "scores": {"tox": 0.9, "pii": 0.0}}]
    with pytest.raises(AttrctlError, match=r"synth\.jsonl: empty dataset.*dropped 1 flagged"):
        build_mixture(_synth_policy(tmp_path, rows, "filter"))
    rows = [{"prompt": "a", "continuation": "b", "scores": {"tox": 0.1}}]  # no `pii` score
    with pytest.raises(AttrctlError, match=r"synth\.jsonl:1: the filter objective needs"):
        build_mixture(_synth_policy(tmp_path, rows, "filter"))


# ------------------------------------------------------------------------------ training runs
@pytest.mark.ci
@pytest.mark.slow
def test_sft_trains_without_ever_fitting_heads(tmp_path):
    policy = write_policy(
        tmp_path, finetune__objective="sft", schedule={"mode": "parallel", "iterations": 2}
    )
    proc = attrctl("train", "-p", policy, "--out", tmp_path / "run", "-q", cwd=tmp_path)
    run = tmp_path / "run"
    jobs = _jobs(run)
    # S_0, θ_1, θ_2, S_2: no fit jobs, no intermediate samples, parallel mode does not apply;
    # `final` records which θ model/final holds
    assert sorted(jobs) == ["final", "finetune/1", "finetune/2", "sample/0", "sample/2"]
    assert jobs["final"] == {"iteration": 2}
    assert not (run / "heads").exists()
    assert all(jobs[f"finetune/{i}"]["heads"] == 0 for i in (1, 2))
    assert jobs["finetune/1"]["objective"] == "sft" and jobs["finetune/1"]["wall_s"] > 0
    steps = _records(run, "step")
    assert len(steps) == 12
    assert all(r["kl"] == 0.0 and r["head_value"] == {} for r in steps)
    assert steps[-1]["ce"] < steps[0]["ce"]  # it learns the mixture
    assert (run / "model" / "final" / "model.safetensors").is_file()
    assert "objective       sft" in proc.stdout and "violation rate" in proc.stdout


@pytest.mark.ci
@pytest.mark.slow
def test_filter_trains_on_the_unflagged_synth_rows(tmp_path):
    from attrctl.data.synth import read_rows

    # A regex "oracle" that flags about half of tiny-random's continuations, so some rows go
    # and some stay; the exact count is read back from the synth file's own scores.
    attributes = [{"name": "toxicity", "oracle": {"kind": "regex", "patterns": ["[aeiou]{2}"]},
                   "head": {"kind": "linear", "rank": 8}}]  # fmt: skip
    policy = write_policy(
        tmp_path, attributes=attributes, finetune__objective="filter",
        finetune__steps=3, schedule={"iterations": 1},
    )  # fmt: skip
    data = json.loads(policy.read_text())
    data["data"][0] = {"kind": "synth", "domain": "toxic", "weight": 0.5,
                       "prompts": ["prompts.txt"], "samples_per_prompt": 3, "max_new_tokens": 6}  # fmt: skip
    policy.write_text(json.dumps(data))
    attrctl("train", "-p", policy, "--out", tmp_path / "run", "-q", cwd=tmp_path)
    run = tmp_path / "run"
    rows = read_rows(run / "data" / "synth.jsonl")
    flagged = sum(r["scores"]["toxicity"] >= 0.5 for r in rows)
    assert len(rows) == len(PROMPTS) * 3 and 0 < flagged < len(rows), flagged
    rec = _jobs(run)["filter"]
    assert rec["dropped"] == flagged
    assert rec["by_source"][0]["kept"] == len(rows) - flagged
    assert rec["by_source"][1]["dropped"] == 0
    assert _records(run, "filter")[0]["dropped"] == flagged
    assert _jobs(run)["finetune/1"]["objective"] == "filter"
    assert (run / "model" / "final" / "config.json").is_file()


@pytest.mark.ci
@pytest.mark.slow
def test_rl_runs_trl_and_exports_a_loadable_model(tmp_path):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from attrctl.models import load_model

    policy = write_policy(
        tmp_path, finetune__objective="rl", finetune__steps=2,
        finetune__rl={"num_generations": 2, "beta": 0.04}, schedule={"iterations": 1},
    )  # fmt: skip
    proc = attrctl("train", "-p", policy, "--out", tmp_path / "run", "-q", cwd=tmp_path)
    run = tmp_path / "run"
    jobs = _jobs(run)
    assert sorted(jobs) == ["final", "finetune/1", "sample/0", "sample/1"]
    rec = jobs["finetune/1"]
    assert rec["objective"] == "rl" and rec["trainer"] == "trl.GRPOTrainer"
    assert rec["completions_per_step"] == 4 and rec["wall_s"] > 0
    steps = _records(run, "rl_step")
    assert [r["step"] for r in steps] == [1, 2]
    assert all(0.0 <= r["reward"] <= 1.0 and "kl" in r for r in steps)  # one attribute, w = 1
    # θ_1 is published like a fine-tune's: the top layer moved, the frozen layer did not
    base = {k: v.detach() for k, v in load_model("tiny-random").model.named_parameters()}
    trained = load_file(str(run / "model" / "iter_1" / "trainable.safetensors"))
    assert trained and all(k.startswith("model.layers.1.") or "norm" in k for k in trained)
    assert any(not torch.equal(trained[k], base[k]) for k in trained)
    model = AutoModelForCausalLM.from_pretrained(run / "model" / "final")
    assert model.config.num_hidden_layers == 2
    assert torch.equal(
        model.model.layers[0].mlp.up_proj.weight, base["model.layers.0.mlp.up_proj.weight"]
    )
    assert not (run / "checkpoints" / "finetune_1").exists()  # TRL's work folder is cleaned
    assert "reward" in proc.stdout and "TRL GRPO" in proc.stdout
