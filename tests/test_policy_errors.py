"""A corpus of malformed policies. Each must give exit code 2, no traceback, and a message that
names the file and the offending key or field (and, where it helps, the allowed values)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

VALID = textwrap.dedent(
    """\
    name: case
    data:
      - kind: bundled
        name: shakespeare
        domain: general
    attributes:
      - name: tox
        oracle:
          kind: lexicon
          words: [idiot]
    """
)

# (case id, policy text, substrings the message must contain)
FILE_CASES: list[tuple[str, str, list[str]]] = [
    # --- bad YAML: line and column
    ("yaml_indent", "name: x\n  data: [\n", ["malformed YAML", "line 2", "column"]),
    ("yaml_unclosed_list", VALID + "seed: [1, 2\n", ["malformed YAML", "line"]),
    ("yaml_tab", "name: x\n\tdata: 1\n", ["malformed YAML", "line 2"]),
    ("yaml_dup_colon", "name: a: b\n", ["malformed YAML", "line 1"]),
    ("empty_file", "", ["empty"]),
    ("top_level_list", "- a\n- b\n", ["mapping", "list"]),
    ("top_level_scalar", "just words\n", ["mapping", "str"]),
    # --- unknown keys / typos, with suggestions
    ("typo_top", VALID + "sede: 3\n", ["sede", "did you mean 'seed'"]),
    ("typo_finetune", VALID + "finetune:\n  stpes: 10\n", ["finetune.stpes", "'steps'"]),
    (
        "typo_source",
        VALID.replace("domain: general", "domian: general"),
        ["data[0].domian", "'domain'"],
    ),
    (
        "typo_attribute",
        VALID.replace("name: tox", "name: tox\n    wieght: 2"),
        ["attributes[0].wieght", "'weight'"],
    ),
    (
        "typo_oracle_param",
        VALID.replace("words: [idiot]", "words: [idiot]\n      case_sensitiv: true"),
        ["attributes[0].oracle.case_sensitiv", "'case_sensitive'"],
    ),
    (
        "typo_target",
        VALID + "    target: {max_violaton: 0.3}\n",
        ["attributes[0].target.max_violaton", "'max_violation'"],
    ),
    ("typo_schedule", VALID + "schedule: {iteratons: 2}\n", ["schedule.iteratons", "'iterations'"]),
    ("typo_lora", VALID + "finetune: {lora: {rank: 4}}\n", ["finetune.lora.rank"]),
    # --- closed sets of kinds and literals
    (
        "unknown_oracle_kind",
        VALID.replace("kind: lexicon", "kind: profanty_check"),
        ["attributes[0].oracle", "profanty_check", "did you mean 'profanity_check'"],
    ),
    (
        "unknown_source_kind",
        VALID.replace("kind: bundled", "kind: s3"),
        ["data[0]", "'s3'", "bundled"],
    ),
    (
        "unknown_head_kind",
        VALID + "    head: {kind: lstm}\n",
        ["attributes[0].head.kind", "'lstm'", "linear"],
    ),
    ("unknown_impl", VALID + "loss: {impl: cuda}\n", ["loss.impl", "'cuda'", "chunked"]),
    ("unknown_schedule_mode", VALID + "schedule: {mode: async}\n", ["schedule.mode", "sequential"]),
    ("unknown_finetune_method", VALID + "finetune: {method: qlora}\n", ["finetune.method", "lora"]),
    (
        "unknown_bundled_corpus",
        VALID.replace("name: shakespeare", "name: wikipedia"),
        ["data[0].name", "shakespeare"],
    ),
    ("unknown_bundled_model", VALID + "model: bundled:gpt5\n", ["model", "gpt5", "smollm2"]),
    (
        "unknown_jigsaw_label",
        VALID.replace(
            "kind: lexicon\n      words: [idiot]", "kind: jigsaw_bilstm\n      labels: [rude]"
        ),
        ["attributes[0].oracle.labels", "rude"],
    ),
    ("missing_kind", VALID.replace("    kind: lexicon\n", ""), ["attributes[0].oracle"]),
    # --- wrong types
    ("steps_not_int", VALID + "finetune: {steps: many}\n", ["finetune.steps", "integer", "many"]),
    (
        "lr_not_number",
        VALID + "finetune: {learning_rate: fast}\n",
        ["finetune.learning_rate", "fast"],
    ),
    (
        "attributes_not_list",
        VALID.replace("attributes:\n", "attributes: 3\nx_unused:\n"),
        ["attributes"],
    ),
    ("data_entry_not_mapping", VALID.replace("data:\n", "data:\n  - just a string\n"), ["data[0]"]),
    (
        "words_not_list",
        VALID.replace("words: [idiot]", "words: 42"),
        ["attributes[0].oracle.words"],
    ),
    # --- out-of-range values
    (
        "negative_weight",
        VALID.replace("domain: general", "domain: general\n    weight: -1"),
        ["data[0].weight", "greater than 0"],
    ),
    (
        "threshold_above_one",
        VALID + "    target: {max_violation: 1.5}\n",
        ["attributes[0].target.max_violation", "less than 1"],
    ),
    (
        "zero_steps",
        VALID + "finetune: {steps: 0}\n",
        ["finetune.steps", "greater than or equal to 1"],
    ),
    ("negative_lambda", VALID + "regularization: {lam: -0.5}\n", ["regularization.lam"]),
    (
        "negative_domain_lambda",
        VALID + "regularization: {per_domain: {general: -1}}\n",
        ["regularization.per_domain.general"],
    ),
    (
        "lexicon_weight_range",
        VALID.replace("words: [idiot]", "words: {idiot: 3}"),
        ["attributes[0].oracle.words", "(0, 1]"],
    ),
    (
        "bad_regex",
        VALID.replace(
            "kind: lexicon\n      words: [idiot]", "kind: regex\n      patterns: ['(unclosed']"
        ),
        ["attributes[0].oracle.patterns", "not a valid regular expression"],
    ),
    # --- missing required fields
    ("missing_name", VALID.replace("name: case\n", ""), ["name", "required field is missing"]),
    (
        "missing_data",
        VALID.split("data:")[0] + "attributes:\n  - name: t\n    oracle: {kind: vader}\n",
        ["data", "required"],
    ),
    ("missing_attributes", VALID.split("attributes:")[0], ["attributes", "required"]),
    ("missing_domain", VALID.replace("    domain: general\n", ""), ["data[0].domain", "required"]),
    (
        "missing_oracle",
        VALID.replace("    oracle:\n      kind: lexicon\n      words: [idiot]\n", ""),
        ["attributes[0].oracle", "required"],
    ),
    (
        "empty_attributes",
        VALID.split("attributes:")[0] + "attributes: []\n",
        ["attributes", "at least 1"],
    ),
    (
        "lexicon_without_words",
        VALID.replace("      words: [idiot]\n", ""),
        ["attributes[0].oracle", "exactly one of `words`"],
    ),
    # --- cross-field checks
    (
        "per_domain_unknown_domain",
        VALID + "regularization: {per_domain: {toxic: 1.0}}\n",
        ["per_domain", "'toxic'", "general"],
    ),
    (
        "duplicate_attribute_names",
        VALID + "  - name: tox\n    oracle: {kind: vader}\n",
        ["unique", "tox"],
    ),
    (
        "bad_attribute_name",
        VALID.replace("name: tox", "name: 9 lives"),
        ["attributes[0].name", "not a valid name"],
    ),
    # --- paths that do not exist (relative to the policy file)
    (
        "missing_data_file",
        VALID.replace(
            "kind: bundled\n    name: shakespeare", "kind: file\n    path: nowhere.jsonl"
        ),
        ["data[0].path", "does not exist", "nowhere.jsonl"],
    ),
    (
        "missing_word_list",
        VALID.replace("words: [idiot]", "path: words/missing.txt"),
        ["attributes[0].oracle.path", "does not exist"],
    ),
    (
        "missing_prompt_file",
        VALID + "regularizer: {prompts: [my_prompts.txt]}\n",
        ["regularizer", "my_prompts.txt"],
    ),
    ("missing_model_folder", VALID + "model: ./checkpoints/none\n", ["model", "does not exist"]),
]

OVERRIDE_CASES: list[tuple[str, list[str], list[str]]] = [
    (
        "override_unknown_key",
        ["finetune.stpes=3"],
        ["finetune.stpes", "--set finetune.stpes=3", "'steps'"],
    ),
    ("override_bad_type", ["finetune.steps=lots"], ["finetune.steps", "--set", "integer"]),
    ("override_bad_literal", ["loss.impl=cuda"], ["loss.impl", "'cuda'", "chunked"]),
    ("override_no_equals", ["finetune.steps"], ["--set finetune.steps", "KEY=VALUE"]),
    (
        "override_index_out_of_range",
        ["attributes.5.weight=2"],
        ["--set attributes.5.weight=2", "out of range"],
    ),
    ("override_bad_yaml", ["seed=[1"], ["--set seed=[1", "not valid YAML"]),
    (
        "override_out_of_range",
        ["attributes.0.target.max_violation=7"],
        ["attributes[0].target.max_violation", "less than 1"],
    ),
]


def _check(code: int, out: str, err: str, expected: list[str], source: str) -> None:
    text = out + err
    assert code == 2, f"exit {code}; output:\n{text}"
    assert "Traceback" not in text
    assert source in text, f"message does not name {source!r}:\n{text}"
    for needle in expected:
        assert needle in text, f"{needle!r} missing from:\n{text}"


def test_corpus_is_large_enough():
    assert len(FILE_CASES) + len(OVERRIDE_CASES) >= 30


@pytest.mark.parametrize(("case", "text", "expected"), FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_malformed_policy_file(run_cli, tmp_path, case, text, expected):
    path = tmp_path / f"{case}.yaml"
    path.write_text(text)
    code, out, err = run_cli("policy", "validate", path)
    _check(code, out, err, expected, str(path))


@pytest.mark.parametrize(
    ("case", "overrides", "expected"), OVERRIDE_CASES, ids=[c[0] for c in OVERRIDE_CASES]
)
def test_bad_override(run_cli, case, overrides, expected):
    args = [a for o in overrides for a in ("--set", o)]
    code, out, err = run_cli("policy", "show", "toxicity", *args)
    _check(code, out, err, expected, "toxicity.yaml")


def test_missing_policy_file(run_cli, tmp_path):
    missing = tmp_path / "nope.yaml"
    code, out, err = run_cli("policy", "show", missing)
    _check(code, out, err, ["file not found"], str(missing))


def test_unknown_bundled_policy_suggests(run_cli):
    code, out, err = run_cli("policy", "show", "toxicty")
    _check(code, out, err, ["did you mean 'toxicity'"], "toxicty")


def test_error_reports_line_of_offending_key(run_cli, tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(VALID + "finetune:\n  steps: 10\n  stpes: 10\n")
    _, _, err = run_cli("policy", "validate", path)
    line = VALID.count("\n") + 3
    assert f"(line {line})" in err


def test_every_problem_is_reported_not_just_the_first(run_cli, tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(VALID + "sede: 1\nfinetune: {steps: 0, lr: 1}\n")
    _, _, err = run_cli("policy", "validate", path)
    assert "sede" in err and "finetune.steps" in err and "finetune.lr" in err


@pytest.mark.parametrize("debug", [False, True])
def test_real_process_exit_code_and_traceback_only_with_debug(tmp_path, debug):
    """The console script, not just main(): exit 2, no traceback unless --debug."""
    path = tmp_path / "p.yaml"
    path.write_text(VALID + "sede: 1\n")
    args = [sys.executable, "-c", "from attrctl.cli import main; raise SystemExit(main())"]
    args += ["--debug"] * debug + ["policy", "show", str(path)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert proc.returncode == (1 if debug else 2)
    assert ("Traceback" in proc.stderr) == debug
    assert "sede" in proc.stderr
