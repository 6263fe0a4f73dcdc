"""bf16 / fp16 weights, bf16 mixed precision and gradient checkpointing (policy ``dtype``,
``finetune.mixed_precision``, ``finetune.gradient_checkpointing``), end to end on tiny-random."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_runs import set_fields, tiny_eval
from transformers import AutoModelForCausalLM


def _policy(tmp: Path, name: str, **extra) -> Path:
    (tmp / "general.txt").write_text("\n\n".join(["The library opens at nine on weekdays."] * 24))
    (tmp / "toxic.txt").write_text("\n\n".join(["You are a stupid idiot, shut up."] * 24))
    (tmp / "prompts.txt").write_text("You are such a\nThe weather today is\nI think that you\n")
    data = {
        "name": name,
        "model": "tiny-random",
        "data": [{"kind": "file", "path": "general.txt", "domain": "general", "weight": 0.5},
                 {"kind": "file", "path": "toxic.txt", "domain": "toxic", "weight": 0.5}],
        "attributes": [{"name": "toxicity", "oracle": {"kind": "profanity_check"},
                        "head": {"kind": "linear", "rank": 8}}],
        "regularization": {"lam": 0.5, "per_domain": {"toxic": 20.0},
                           "own_samples": {"lam": 5.0, "rows": 2, "refresh_every": 2,
                                           "max_new_tokens": 4}},
        "regularizer": {"prompts": ["prompts.txt"], "samples_per_prompt": 4,
                        "max_new_tokens": 4, "epochs": 3, "batch_size": 4, "learning_rate": 0.1},
        "finetune": {"method": "top_layers", "top_layers": 1, "steps": 3, "batch_size": 2,
                     "seq_len": 16, "learning_rate": 1e-2},
        "schedule": {"mode": "sequential", "iterations": 1},
        "loss": {"impl": "chunked"},
    }  # fmt: skip
    set_fields(data, extra)
    path = tmp / f"{name}.yaml"
    path.write_text(json.dumps(data))
    return path


def _train(run_cli, tmp: Path, name: str, **extra) -> Path:
    code, _, err = run_cli("train", "-p", _policy(tmp, name, **extra), "--out", tmp / name, "-q")
    assert code == 0, err
    return tmp / name


def _losses(run: Path) -> list[float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r.get("kind") == "step"]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model" / "iter_1" / "trainable.safetensors"))


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory):
    from attrctl.cli import main

    tmp = tmp_path_factory.mktemp("fp32")

    def run_cli(*args):
        return main([str(a) for a in args]), "", ""

    import os

    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        return _train(run_cli, tmp, "fp32")
    finally:
        os.chdir(cwd)


@pytest.mark.ci
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_run_end_to_end(dtype, run_cli, tmp_path, monkeypatch, fp32_run):
    monkeypatch.chdir(tmp_path)
    run = _train(run_cli, tmp_path, "half", dtype=dtype)
    trained = _weights(run)
    # bf16 trains in bf16; under fp16 the trained tensors are fp32 master weights
    master = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    assert {t.dtype for t in trained.values()} == {master}
    losses, ref = _losses(run), _losses(fp32_run)
    assert all(torch.isfinite(torch.tensor(losses)))
    # same data, heads and steps: the loss follows the fp32 run's to the dtype's precision
    assert losses == pytest.approx(ref, rel=3e-2)
    tiny_eval(run_cli, run, tmp_path)
    code, _, err = run_cli("export", run, "--out", tmp_path / "export")
    assert code == 0, err
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype="auto")
    assert back.dtype == getattr(torch, dtype)
    params = dict(back.named_parameters())
    for name, tensor in trained.items():  # saved in the model's dtype
        assert torch.equal(params[name], tensor.to(back.dtype)), name


@pytest.mark.ci
def test_mixed_precision_keeps_fp32_weights_and_tracks_the_fp32_run(
    run_cli, tmp_path, monkeypatch, fp32_run
):
    monkeypatch.chdir(tmp_path)  # fmt: skip
    run = _train(run_cli, tmp_path, "amp", finetune__mixed_precision="bf16")
    trained, ref = _weights(run), _weights(fp32_run)
    assert {t.dtype for t in trained.values()} == {torch.float32}  # master weights
    assert _losses(run) == pytest.approx(_losses(fp32_run), rel=2e-2)
    # bf16 compute is not fp32 compute: the weights are close but not the same
    assert any(not torch.equal(trained[n], ref[n]) for n in ref)


@pytest.mark.ci
def test_gradient_checkpointing_gives_the_same_weights(run_cli, tmp_path, monkeypatch, fp32_run):
    monkeypatch.chdir(tmp_path)
    run = _train(run_cli, tmp_path, "ckpt", finetune__gradient_checkpointing=True)
    state = json.loads((run / "state.json").read_text())["jobs"]
    assert state["finetune/1"]["gradient_checkpointing"] is True  # the setting took effect
    trained, ref = _weights(run), _weights(fp32_run)
    assert _losses(run) == pytest.approx(_losses(fp32_run), rel=1e-6)
    for name, tensor in ref.items():  # recomputation repeats the same fp32 operations
        torch.testing.assert_close(trained[name], tensor, rtol=1e-6, atol=1e-7, msg=name)
