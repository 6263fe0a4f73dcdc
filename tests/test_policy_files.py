"""Every shipped policy loads, compiles and shows; the schema's documented behaviour holds."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from attrctl.policy import compile_policy, load_policy
from attrctl.policy.load import validate_policy
from attrctl.policy.show import resolved_dict

POLICIES = Path(__file__).resolve().parents[1] / "policies"
SHIPPED = sorted(POLICIES.glob("*.yaml"))


def test_there_are_shipped_policies():
    assert {p.stem for p in SHIPPED} >= {"toxicity", "toxicity_sentiment", "no_pii"}
    # the baselines of the paper's table (tests/test_baselines.py checks what they share)
    assert {p.stem for p in SHIPPED} >= {
        "toxicity_sft", "toxicity_filter", "toxicity_rl", "toxicity_uniform"
    }  # fmt: skip


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_policy_loads_and_compiles(path):
    policy = load_policy(path)
    assert policy.name == path.stem
    compiled = compile_policy(policy)
    assert [a.name for a in compiled.attributes] == [a.name for a in policy.attributes]
    # every oracle scores a batch to probabilities
    for attr in compiled.attributes:
        scores = attr.oracle.score(["a perfectly ordinary sentence", "another one"])
        assert scores.shape == (2,)
        assert ((scores >= 0) & (scores <= 1)).all()
    # λ_d resolved for every domain in the mixture
    assert set(compiled.lam_by_domain) == {s.domain for s in policy.data}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_resolved_policy_round_trips(path, tmp_path):
    """`policy show` output is itself a valid policy that resolves to the same thing."""
    policy = load_policy(path)
    shown = resolved_dict(policy)
    again = validate_policy(yaml.safe_load(yaml.safe_dump(shown)), source=path)
    assert resolved_dict(again) == shown


def test_bundled_name_and_path_give_the_same_policy():
    assert load_policy("toxicity") == load_policy(POLICIES / "toxicity.yaml")


def test_default_policy_is_adaptive_on_toxic_domain():
    compiled = compile_policy(load_policy("toxicity"))
    assert compiled.policy.adaptive
    assert compiled.lam_for("toxic") > compiled.lam_for("general")
    assert {s.domain for s in compiled.policy.data} == {"toxic", "general"}


def test_two_attribute_policy_composes_weights():
    compiled = compile_policy(load_policy("toxicity_sentiment"))
    assert len(compiled.attributes) == 2
    assert compiled.attr_weights == [a.weight for a in compiled.policy.attributes]


def test_overrides_are_applied_and_typed():
    policy = load_policy("toxicity", ["finetune.steps=7", "loss.impl=eager", "seed=3"])
    assert policy.finetune.steps == 7
    assert policy.loss.impl == "eager"
    assert policy.seed == 3
    # the file itself is untouched by overrides
    assert load_policy("toxicity").finetune.steps != 7


def test_override_can_add_list_entries_by_index():
    policy = load_policy("toxicity", ["attributes.0.oracle.kind=vader"])
    assert policy.attributes[0].oracle.kind == "vader"


def test_hard_and_soft_labels(minimal_policy, tmp_path):
    import numpy as np

    policy = validate_policy(minimal_policy, source=tmp_path / "p.yaml")
    attr = compile_policy(policy).attributes[0]
    scores = np.array([0.1, 0.49, 0.5, 0.9])
    assert attr.labels(scores).tolist() == [1.0, 1.0, 0.0, 0.0]
    soft = minimal_policy | {
        "attributes": [
            {
                "name": "tox",
                "oracle": {"kind": "lexicon", "words": ["x"]},
                "target": {"labels": "soft"},
            }
        ]
    }
    attr = compile_policy(validate_policy(soft, source=tmp_path / "p.yaml")).attributes[0]
    assert np.allclose(attr.labels(scores), 1 - scores)


def test_relative_paths_resolve_against_policy_folder(tmp_path, minimal_policy, monkeypatch):
    (tmp_path / "words.txt").write_text("idiot\nmoron\t0.5\n")
    minimal_policy["attributes"][0]["oracle"] = {"kind": "lexicon", "path": "words.txt"}
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.chdir(other)  # the working directory must not matter
    policy = validate_policy(minimal_policy, source=tmp_path / "p.yaml")
    assert policy.attributes[0].oracle.path == str((tmp_path / "words.txt").resolve())
    oracle = compile_policy(policy).attributes[0].oracle
    assert oracle.score(["you moron"]).tolist() == [0.5]


def test_policy_show_cli(run_cli):
    code, out, _ = run_cli("policy", "show", "toxicity", "--set", "finetune.steps=11")
    assert code == 0
    shown = yaml.safe_load(out)
    assert shown["finetune"]["steps"] == 11
    # defaults not written in the file are filled in
    assert shown["finetune"]["lora"]["r"] == 8
    assert shown["data"][0]["kind"] == "synth"


def test_policy_validate_cli_json(run_cli, tmp_path):
    import json

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\n")
    code, out, _ = run_cli("policy", "validate", "--json", POLICIES / "toxicity.yaml", bad)
    assert code == 2
    results = json.loads(out)
    assert [r["valid"] for r in results] == [True, False]
    assert any("data" in p for p in results[1]["problems"])


def test_policy_validate_all_shipped_exits_zero(run_cli):
    code, out, err = run_cli("policy", "validate", *SHIPPED)
    assert code == 0, err
    assert out.count("ok") == len(SHIPPED)


def test_policy_ls_lists_bundled_with_descriptions(run_cli):
    code, out, _ = run_cli("policy", "ls")
    assert code == 0
    for path in SHIPPED:
        assert path.stem in out
    assert "INVALID" not in out


@pytest.mark.parametrize("kind", ["lexicon", "regex", "profanity_check", "vader", "jigsaw_bilstm"])
def test_policy_new_writes_a_valid_commented_template(run_cli, tmp_path, kind):
    out_file = tmp_path / f"{kind}.yaml"
    code, _, err = run_cli("policy", "new", "mine", "--attribute", kind, "--out", out_file)
    assert code == 0, err
    text = out_file.read_text()
    assert text.count("\n# ") + text.count("  # ") >= 10  # documented keys
    policy = load_policy(out_file)
    assert policy.attributes[0].oracle.kind == kind
    # refuses to overwrite
    code, _, err = run_cli("policy", "new", "mine", "--attribute", kind, "--out", out_file)
    assert code == 2 and "already exists" in err


def test_train_validates_policy_before_anything_runs(run_cli, tmp_path):
    code, _, err = run_cli(
        "train", "--policy", "toxicity", "--set", "finetune.steps=-1", "--out", tmp_path / "r"
    )
    assert code == 2 and "finetune.steps" in err
    assert not (tmp_path / "r").exists()  # nothing written for an invalid policy


def test_policy_reference_doc_is_generated_from_the_schema(run_cli):
    code, out, _ = run_cli("policy", "reference")
    assert code == 0
    doc = (POLICIES.parent / "docs" / "policy-reference.md").read_text()
    assert out == doc, "docs/policy-reference.md is stale: attrctl policy reference > it"
    from attrctl.policy.schema import FineTune

    assert f"`{FineTune.model_fields['steps'].default}`" in doc
