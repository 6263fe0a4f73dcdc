"""The checks to run the day a GPU is lent (``attrctl bench gpu`` / ``make gpu-check``).

Three parts, each with its own time limit so the whole fits 8 minutes on one H100, each reported
``passed`` / ``failed`` / ``skipped`` (with the reason) in one JSON and one Markdown file:

1. ``tests``: the ``gpu``-marked tests (the Triton kernels on CUDA, bf16 included);
2. ``bench_loss``: ``bench loss`` at the SmolLM2 and Llama-2 shapes, fwd + bwd in bf16: eager,
   chunked, ``torch.compile`` of the eager loss, the Triton kernel and, when ``liger-kernel``
   imports, Liger's fused linear cross-entropy (no KL term: a lower bound on the fused CE cost);
3. ``finetune``: a short bf16 regularized fine-tune of the tiny model on CUDA, end to end
   (sample, fit, fine-tune), its time and final losses.

Without CUDA each part is reported as skipped, so the script itself is exercised on CPU machines.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
NO_CUDA = "no CUDA device here"


def _part(status: str, seconds: float, **detail: Any) -> dict[str, Any]:
    return {"status": status, "seconds": round(seconds, 1), **detail}


def run_gpu_tests(timeout: int) -> dict[str, Any]:
    """``pytest -m gpu`` in a subprocess; the counts from its summary line."""
    t0 = time.perf_counter()
    if not (ROOT / "tests").is_dir():
        return _part("skipped", 0, reason="no tests/ folder next to the package (not a checkout)")
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
           str(ROOT / "tests")]  # fmt: skip
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return _part("failed", time.perf_counter() - t0, reason=f"timed out after {timeout} s")
    tail = proc.stdout.strip().splitlines()[-1:] or [""]
    counts = {k: 0 for k in ("passed", "failed", "skipped", "error")}
    for n, what in re.findall(r"(\d+) (passed|failed|skipped|errors?)", tail[0]):
        counts[what.rstrip("s") if what.startswith("error") else what] = int(n)
    if counts["failed"] or counts["error"] or proc.returncode not in (0, 5):
        status = "failed"
    elif counts["passed"]:
        status = "passed"
    else:
        status = "skipped"
    detail: dict[str, Any] = {"counts": counts, "summary": tail[0]}
    if status == "skipped":
        detail["reason"] = NO_CUDA if not torch.cuda.is_available() else "no gpu test ran"
    if status == "failed":
        detail["output_tail"] = proc.stdout[-3000:]
    return _part(status, time.perf_counter() - t0, **detail)


def run_bench_loss(ns: list[int]) -> dict[str, Any]:
    """The loss benchmark rows at model shapes on CUDA, bf16, fwd + bwd."""
    if not torch.cuda.is_available():
        return _part("skipped", 0, reason=NO_CUDA)
    from dataclasses import asdict

    from attrctl.bench.loss import format_table, run_loss_benchmark

    t0 = time.perf_counter()
    impls = ["eager", "chunked", "compile", "triton"]
    try:
        import liger_kernel  # noqa: F401

        impls.append("liger")
    except ImportError:
        pass
    rows = run_loss_benchmark(shapes=["smollm2", "llama2"], ns=ns, impls=impls,
                              modes=["fwd_bwd"], dtype="bf16", device="cuda")  # fmt: skip
    failed = [r for r in rows if getattr(r, "error", None)]
    return _part("failed" if failed else "passed", time.perf_counter() - t0,
                 impls=impls, rows=[asdict(r) for r in rows],
                 table=format_table(rows))  # fmt: skip


FINETUNE_POLICY = {
    "name": "gpu_check",
    "model": "tiny-random",
    "dtype": "bfloat16",
    "data": [{"kind": "bundled", "name": "shakespeare", "split": "train", "domain": "general"}],
    "attributes": [{"name": "toxicity", "oracle": {"kind": "profanity_check"},
                    "head": {"kind": "linear", "rank": 16}}],
    "regularization": {"lam": 1.0},
    "regularizer": {"prompts": ["toxic"], "samples_per_prompt": 2, "max_new_tokens": 12,
                    "epochs": 1},
    "finetune": {"method": "top_layers", "top_layers": 1, "steps": 40, "batch_size": 8,
                 "seq_len": 128},
    "schedule": {"mode": "sequential", "iterations": 1,
                 "roles": {r: {"device": "cuda"} for r in ("sample", "fit", "finetune")}},
    "loss": {"impl": "auto"},
}  # fmt: skip


def run_finetune(timeout: int, device: str = "cuda", steps: int | None = None) -> dict[str, Any]:
    """A short bf16 regularized fine-tune through ``attrctl train`` (on CUDA; ``device="cpu"``
    and fewer ``steps`` exercise the same path without one)."""
    if device == "cuda" and not torch.cuda.is_available():
        return _part("skipped", 0, reason=NO_CUDA)
    t0 = time.perf_counter()
    data = json.loads(json.dumps(FINETUNE_POLICY))
    for role in data["schedule"]["roles"].values():
        role["device"] = device
    if steps is not None:
        data["finetune"]["steps"] = steps
    with tempfile.TemporaryDirectory() as tmp:
        policy = Path(tmp) / "gpu_check.yaml"
        policy.write_text(json.dumps(data))
        cmd = [sys.executable, "-m", "attrctl.cli", "train", "-p", str(policy), "--out",
               str(Path(tmp) / "run"), "-q"]  # fmt: skip
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return _part("failed", time.perf_counter() - t0, reason=f"timed out after {timeout} s")
        if proc.returncode != 0:
            return _part("failed", time.perf_counter() - t0, output_tail=proc.stderr[-3000:])
        state = json.loads((Path(tmp) / "run" / "state.json").read_text())["jobs"]
        ft = state["finetune/1"]
    return _part("passed", time.perf_counter() - t0, ce_first=ft["ce_first"],
                 ce_last=ft["ce_last"], kl_last=ft["kl_last"],
                 finetune_seconds=ft["seconds"])  # fmt: skip


def gpu_check(out: Path, *, quick: bool = False) -> dict[str, Any]:
    """Run the three parts and write ``gpu_check.json`` and ``gpu_check.md`` into ``out``."""
    from attrctl.bench.harness import environment

    out.mkdir(parents=True, exist_ok=True)
    report = {
        "environment": environment("cuda" if torch.cuda.is_available() else "cpu"),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "tests": run_gpu_tests(timeout=180),
        "bench_loss": run_bench_loss([2048] if quick else [4096, 16384]),
        "finetune": run_finetune(timeout=180),
    }
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "gpu_check.md").write_text(describe(report) + "\n")
    return report


def describe(report: dict[str, Any]) -> str:
    lines = [f"# GPU check — {report['cuda'] or 'no CUDA device'}", "",
             "| part | status | seconds | detail |", "|---|---|---|---|"]  # fmt: skip
    for key in ("tests", "bench_loss", "finetune"):
        part = report[key]
        detail = part.get("reason") or part.get("summary") or ""
        if key == "finetune" and part["status"] == "passed":
            detail = f"CE {part['ce_first']:.3f} → {part['ce_last']:.3f}, KL {part['kl_last']:.4f}"
        lines.append(f"| {key} | {part['status']} | {part['seconds']} | {detail} |")
    table = report["bench_loss"].get("table")
    if table:
        lines += ["", "## bench loss (bf16, fwd + bwd)", "", table]
    return "\n".join(lines)


def exit_code(report: dict[str, Any]) -> int:
    """1 when a part failed; skipped parts do not fail the check."""
    return int(any(report[k]["status"] == "failed" for k in ("tests", "bench_loss", "finetune")))
