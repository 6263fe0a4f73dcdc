"""A fine-tune checkpoint keeps every random generator a step draws from: the CPU one and, on a
GPU, each CUDA device's — so a run resumed on CUDA continues the same random streams.

This machine has no GPU: torch.cuda's generator functions are replaced by recording stand-ins,
which checks what is saved and restored (a real GPU resume is the same code path)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from attrctl.train.finetune import rng_state, set_rng_state


@pytest.fixture
def two_gpus(monkeypatch):
    states = [torch.arange(8, dtype=torch.uint8), torch.arange(8, 16, dtype=torch.uint8)]
    restored: list[torch.Tensor] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in states])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda new: restored.extend(new))
    return states, restored


def test_cuda_generators_are_saved_and_restored(two_gpus, tmp_path, monkeypatch):
    states, restored = two_gpus
    torch.manual_seed(3)
    saved = rng_state()
    assert sorted(saved) == ["cpu", "cuda:0", "cuda:1"]
    save_file(saved, str(tmp_path / "rng.safetensors"))  # as the checkpoint writes it
    expected = torch.rand(4)
    set_rng_state(load_file(str(tmp_path / "rng.safetensors")))
    assert torch.equal(torch.rand(4), expected)  # the CPU stream continues where it was saved
    assert len(restored) == 2 and all(
        torch.equal(a, b) for a, b in zip(restored, states, strict=True)
    )
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="2 CUDA generator"):
        set_rng_state(saved)  # a checkpoint of two GPUs on a machine with one


def test_cpu_only_checkpoints_hold_the_cpu_generator_alone():
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        pytest.skip("CUDA is in use in this process")
    assert list(rng_state()) == ["cpu"]
    with pytest.raises(ValueError, match="no 'cpu'"):
        set_rng_state({})
