"""`attrctl export` and guided decoding from a real (tiny) finished run.

One `attrctl train` process makes the run: tiny-random, LoRA fine-tuning (so the export must carry
merged weights), one sequential iteration, a fitted linear head. The exported folder is then loaded
in a Python process where `import attrctl` fails, and its greedy generation compared with that of
the run's model/final.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from attrctl.errors import AttrctlError
from attrctl.export import check_model_folder, export_run

PROMPT = "The weather today is"
BLOCK_ATTRCTL = textwrap.dedent(
    """
    import sys, importlib.abc

    class _NoAttrctl(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "attrctl" or name.startswith("attrctl."):
                raise ImportError("attrctl is not installed (blocked by test)")
            return None

    sys.meta_path.insert(0, _NoAttrctl())
    try:
        import attrctl
    except ImportError:
        pass
    else:
        raise SystemExit("attrctl could still be imported")
    """
)


def _env() -> dict:
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONHASHSEED="0")
    return e


def _policy(tmp: Path) -> Path:
    (tmp / "toxic.txt").write_text("\n\n".join(["You are a stupid idiot.", "Shut up, moron."] * 8))
    (tmp / "general.txt").write_text("\n\n".join(["The library opens at nine.", "Rain later."] * 8))
    (tmp / "prompts.txt").write_text("You are such a\nThe weather today is\n")
    policy = {
        "name": "tinyexport",
        "description": "A tiny run for the export tests.",
        "model": "tiny-random",
        "data": [
            {"kind": "file", "path": "toxic.txt", "domain": "toxic", "weight": 0.5},
            {"kind": "file", "path": "general.txt", "domain": "general", "weight": 0.5},
        ],
        "attributes": [{"name": "toxicity", "oracle": {"kind": "profanity_check"},
                        "head": {"kind": "linear", "rank": 8}}],
        "regularization": {"lam": 0.1, "per_domain": {"toxic": 5.0}},
        "regularizer": {"prompts": ["prompts.txt"], "samples_per_prompt": 4,
                        "max_new_tokens": 6, "epochs": 2, "batch_size": 4},
        "finetune": {"method": "lora", "lora": {"r": 4}, "steps": 4, "batch_size": 4,
                     "seq_len": 16, "checkpoint_every": 100, "learning_rate": 5e-3},
        "schedule": {"mode": "sequential", "iterations": 1},
        "loss": {"impl": "chunked"},
    }  # fmt: skip
    path = tmp / "tinyexport.yaml"
    path.write_text(json.dumps(policy))
    return path


EVAL = {
    "label": "tinyexport",
    "method": "regularized",
    "control": {"heldout_toxic": {"toxicity": {
        "oracle": {"fraction": {"value": 0.1, "ci": [0.05, 0.15]}},
        "judge": {"fraction": {"value": 0.08, "ci": [0.04, 0.12]}}}}},
    "utility": {"heldout_ppl": {"value": 123.4, "tokens": 100}, "mc": None},
}  # fmt: skip


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("export_run")
    policy = _policy(tmp)
    cmd = [sys.executable, "-m", "attrctl.cli", "train", "-p", str(policy), "--out",
           str(tmp / "run"), "-q"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (tmp / "run" / "eval.json").write_text(json.dumps(EVAL))
    return tmp / "run"


def _greedy_ids(model, tok, new: int = 6) -> list[int]:
    enc = tok([PROMPT], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, do_sample=False, max_new_tokens=new,
                             pad_token_id=tok.pad_token_id)  # fmt: skip
    return out[0].tolist()


@pytest.mark.slow
@pytest.mark.ci
def test_export_loads_without_attrctl_and_generates_the_same(finished_run, tmp_path, run_cli):
    out = tmp_path / "exported"
    code, stdout, err = run_cli("export", finished_run, "--out", out)
    assert code == 0, err
    assert str(out) in stdout
    for f in (
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "heads/heads.json",
        "heads/heads.safetensors",
        "policy.yaml",
        "eval.json",
        "README.md",
    ):
        assert (out / f).is_file(), f  # fmt: skip
    assert any(out.glob("tokenizer*")), sorted(p.name for p in out.iterdir())
    assert not list(out.parent.glob(".exported.*"))  # no temporary folder left behind
    card = (out / "README.md").read_text()
    for text in (
        "tinyexport",
        "toxicity",
        "profanity_check",
        "lora",
        "CE",
        "load_guidance",
        "from_pretrained",
        "123.4",
        "8.0% (4.0–12.0)",
    ):
        assert text in card, text  # fmt: skip

    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = finished_run / "model" / "final"
    expected = _greedy_ids(
        AutoModelForCausalLM.from_pretrained(final), AutoTokenizer.from_pretrained(final)
    )
    code = BLOCK_ATTRCTL + textwrap.dedent(
        f"""
        import json, torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained({str(out)!r})
        tok = AutoTokenizer.from_pretrained({str(out)!r})
        enc = tok([{PROMPT!r}], return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(**enc, do_sample=False, max_new_tokens=6,
                                 pad_token_id=tok.pad_token_id)
        print(json.dumps(ids[0].tolist()))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == expected
    # the LoRA update is in the exported weights (merged), not lost
    from attrctl.models import load_model

    base = dict(load_model("tiny-random").model.named_parameters())
    exported = dict(AutoModelForCausalLM.from_pretrained(out).named_parameters())
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(base[q], exported[q])


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.slow
@pytest.mark.ci
def test_existing_target_is_refused_untouched(finished_run, tmp_path, run_cli):
    target = tmp_path / "taken"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    code, _, err = run_cli("export", finished_run, "--out", target)
    assert code == 2 and str(target) in err and "already exists" in err
    assert _snapshot(target) == {"keep.txt": b"mine"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # no temporary left


def test_unfinished_run_is_refused(tmp_path, run_cli):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text("{}")
    code, _, err = run_cli("export", run, "--out", tmp_path / "out")
    assert code == 2 and "no finished model" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    code, _, err = run_cli("export", tmp_path / "nothing", "--out", tmp_path / "out")
    assert code == 2 and "no such run directory" in err


def test_unmerged_lora_weights_are_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    save_file({"model.layers.0.q_proj.lora_A.weight": torch.zeros(2, 2)},
              str(tmp_path / "model.safetensors"))  # fmt: skip
    with pytest.raises(AttrctlError, match="not merged"):
        check_model_folder(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(AttrctlError, match="adapter"):
        check_model_folder(tmp_path)


@pytest.mark.slow
@pytest.mark.ci
def test_guided_generation_from_the_run_and_its_export(finished_run, tmp_path, run_cli):
    from attrctl.guided import load_guidance
    from attrctl.models import load_model

    model = load_model(str(finished_run / "model" / "final")).model
    with load_guidance(finished_run, model) as proc:
        assert proc.heads[0].weight.abs().sum() > 0  # the fitted head, not a zero one
        weight = proc.heads[0].weight.clone()
    out = export_run(finished_run, tmp_path / "exp").out
    with load_guidance(out, model) as proc:  # an export folder works as well
        assert torch.equal(proc.heads[0].weight, weight)
    code, stdout, err = run_cli("generate", finished_run, PROMPT, "--guided", "-n", "2",
                                "--max-new-tokens", "5")  # fmt: skip
    assert code == 0, err
    assert "guided by" in err and stdout.count(PROMPT) == 2
    code, stdout, err = run_cli("generate", "tiny-random", PROMPT, "--heads", out,
                                "--max-new-tokens", "5")  # fmt: skip
    assert code == 0, err  # the run's heads steering the base model: NADO decoding
    # a run whose fit jobs fitted nothing has no heads to guide with
    bare = tmp_path / "bare"
    shutil.copytree(finished_run, bare)
    state = json.loads((bare / "state.json").read_text())
    for job, rec in state["jobs"].items():
        if job.startswith("fit/"):
            rec["fitted"] = False
    (bare / "state.json").write_text(json.dumps(state))
    with pytest.raises(AttrctlError, match="no fitted regularizer heads"):
        load_guidance(bare, model)
    code, _, err = run_cli("generate", bare, PROMPT, "--guided")
    assert code == 2 and "no fitted" in err
