"""The documented commands work when started in the repository root.

The repo's top-level ``kernels/`` folder (installed as ``attrctl.kernels``) is also importable as
a top-level ``kernels`` whenever the repo root is on ``sys.path`` — ``python -m`` and ``python -c``
started there put it first — and transformers imports the PyPI ``kernels`` package by that name
(``from kernels import CUDAProperties, …`` in ``transformers.integrations.hub_kernels``, loaded
with any model). Every test here runs a fresh interpreter with the repo root as its current
directory, as a user's shell, the parallel roles and ``torchrun`` do.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SITE_PACKAGES = Path(importlib.metadata.distribution("transformers").locate_file(""))


def _kernels_installed() -> bool:
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def run_in_root(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python ARGS`` with the repo root as the current directory."""
    assert (ROOT / "kernels" / "__init__.py").is_file()  # the shadowing folder is there
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env.pop("PYTHONSAFEPATH", None)  # it would keep the current directory off sys.path
    env.pop("PYTHONPATH", None)
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=timeout, check=False,
    )  # fmt: skip


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "ImportError" not in proc.stderr, proc.stderr[-4000:]


def test_cli_loads_a_model_from_repo_root():
    proc = run_in_root("-m", "attrctl.cli", "models", "info", "tiny-random")
    _ok(proc)
    assert "hidden_size" in proc.stdout


def test_python_c_importing_transformers_first_loads_the_tiny_model():
    code = """
        import transformers, attrctl
        from transformers import AutoModelForCausalLM
        import transformers.activations  # imports transformers.integrations.hub_kernels
        from attrctl.models.load import load_model
        lm = load_model("tiny-random")
        assert isinstance(lm.model, transformers.PreTrainedModel), type(lm.model)
        print("ok")
    """
    proc = run_in_root("-c", textwrap.dedent(code))
    _ok(proc)
    assert proc.stdout.strip().endswith("ok")


@pytest.mark.skipif(not _kernels_installed(), reason="the PyPI `kernels` package is not installed")
def test_top_level_kernels_is_the_installed_package_and_attrctl_kernels_is_ours():
    code = """
        import json, kernels, attrctl.kernels
        from transformers.utils.import_utils import is_kernels_available
        import transformers.integrations.hub_kernels
        print(json.dumps({
            "kernels": kernels.__file__,
            "has_cuda_properties": hasattr(kernels, "CUDAProperties"),
            "attrctl_kernels": attrctl.kernels.__file__,
            "has_token_kl": hasattr(attrctl.kernels, "token_kl"),
            "available": is_kernels_available(),
        }))
    """
    proc = run_in_root("-c", textwrap.dedent(code))
    _ok(proc)
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    installed = Path(importlib.metadata.distribution("kernels").locate_file("kernels"))
    assert Path(got["kernels"]).resolve() == (installed / "__init__.py").resolve(), got
    assert got["has_cuda_properties"] and got["available"], got
    assert got["attrctl_kernels"] != got["kernels"] and got["has_token_kl"], got


def test_without_the_pypi_kernels_package_transformers_sees_none(tmp_path):
    """With no other ``kernels`` installed, the repo's folder stays the top-level ``kernels`` and
    transformers counts hub kernels as unavailable (no ``__version__``) instead of failing."""
    farm = tmp_path / "site"  # site-packages without the `kernels` package: links to the rest
    farm.mkdir()
    for entry in SITE_PACKAGES.iterdir():
        if entry.name == "kernels" or entry.name.startswith("kernels-"):
            continue
        (farm / entry.name).symlink_to(entry)
    code = f"""
        import site
        site.addsitedir({str(farm)!r})
        import kernels
        from transformers.utils.import_utils import is_kernels_available
        import transformers.integrations.hub_kernels
        from attrctl.models.load import load_model
        load_model("tiny-random")
        print(kernels.__file__, is_kernels_available())
    """
    proc = run_in_root("-S", "-c", textwrap.dedent(code))  # -S: the real site-packages stays off
    _ok(proc)
    assert proc.stdout.split() == [str(ROOT / "kernels" / "__init__.py"), "False"]


def _tiny_run_dir(root: Path) -> Path:
    """A run directory with just the resolved policy a parallel role reads (tiny-random)."""
    root.mkdir()
    (root / "general.txt").write_text("\n\n".join(["The library opens at nine."] * 8))
    (root / "prompts.txt").write_text("The weather today is\n")
    policy = {
        "name": "tiny",
        "model": "tiny-random",
        "data": [{"kind": "file", "path": "general.txt", "domain": "general"}],
        "attributes": [{"name": "tox", "oracle": {"kind": "lexicon", "words": ["idiot"]}}],
        "regularizer": {"prompts": ["prompts.txt"], "samples_per_prompt": 2,
                        "max_new_tokens": 4, "batch_size": 2},
        "finetune": {"method": "top_layers", "top_layers": 1, "steps": 2, "batch_size": 2,
                     "seq_len": 16},
        "loss": {"impl": "chunked"},
    }  # fmt: skip
    (root / "policy.yaml").write_text(json.dumps(policy))  # JSON is YAML
    return root


def test_parallel_role_process_runs_from_repo_root(tmp_path):
    """A parallel schedule starts each job as ``python -m attrctl.train.role`` in the current
    directory (attrctl/train/schedules.py run_roles); here the sample job, which loads the model."""
    run = _tiny_run_dir(tmp_path / "run")
    from attrctl.train.plan import SampleJob

    proc = run_in_root("-m", "attrctl.train.role", str(run), SampleJob(0).to_json(), "0")
    _ok(proc)
    result = json.loads((run / ".roles" / "sample_0.json").read_text())
    assert result["rows"] == 2, result


def test_readme_torchrun_module_launch_from_repo_root():
    """docs/training.md's ``torchrun --nproc-per-node N -m attrctl.cli …``, one rank, a model
    load."""
    assert "torchrun --nproc-per-node 2 -m attrctl.cli" in (ROOT / "docs/training.md").read_text()
    proc = run_in_root(
        "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
        "-m", "attrctl.cli", "models", "info", "tiny-random",
    )  # fmt: skip
    _ok(proc)
    assert "hidden_size" in proc.stdout
