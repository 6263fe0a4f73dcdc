"""``attrctl export``: a finished run as a Hugging Face model folder, with its heads and a card.

The folder holds the run's ``model/final`` (``config.json``, ``model.safetensors``, tokenizer
files, ``generation_config.json``; LoRA adapters already merged) — loadable with
``AutoModelForCausalLM.from_pretrained`` and no attrctl installed — and beside it what attrctl
needs to guide decoding with the run's heads and what a reader needs to judge the model::

    config.json, model.safetensors, tokenizer*, generation_config.json
    heads/heads.safetensors, heads/heads.json    the last fitted heads (when the run fitted any)
    policy.yaml                                  the resolved policy the run trained under
    eval*.json                                   every `attrctl eval` result in the run directory
    README.md                                    a model card: policy, attributes, training, eval

The folder is built under a temporary name beside the target and renamed into place; an existing
target is refused and left untouched.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from attrctl.errors import AttrctlError
from attrctl.paths import atomic_dir
from attrctl.train.rundir import FinishedRun, RunDir, open_finished_run

_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


@dataclass(frozen=True)
class ExportResult:
    """Where the export went and what it holds (paths relative to ``out``)."""

    out: Path
    files: list[str]
    heads: bool
    evals: list[str]


def export_run(run: FinishedRun | str | os.PathLike, out: str | os.PathLike) -> ExportResult:
    """Write a finished run's model, heads, policy, eval results and model card to ``out``.

    Args:
        run: a :class:`FinishedRun` or a run directory.
        out: the folder to create; it must not exist.

    Raises:
        AttrctlError: ``out`` exists (nothing is changed), the run is unfinished, or its final
            model still holds LoRA adapters or is not a complete transformers folder.
    """
    out = Path(out).expanduser()
    if out.exists() or out.is_symlink():
        raise AttrctlError(
            f"{out} already exists; nothing was changed: pass another --out, or remove it first"
        )
    fin = run if isinstance(run, FinishedRun) else open_finished_run(run)
    check_model_folder(fin.model_dir)
    evals = sorted(p for p in fin.root.glob("eval*.json") if p.is_file())
    with atomic_dir(out) as tmp:
        for f in sorted(fin.model_dir.iterdir()):
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
        if not (tmp / "generation_config.json").exists():
            _write_generation_config(tmp)
        if fin.heads_dir is not None:
            (tmp / "heads").mkdir()
            for name in ("heads.safetensors", "heads.json"):
                if (fin.heads_dir / name).is_file():
                    shutil.copy2(fin.heads_dir / name, tmp / "heads" / name)
        shutil.copy2(fin.policy_path, tmp / "policy.yaml")
        for e in evals:
            shutil.copy2(e, tmp / e.name)
        (tmp / "README.md").write_text(model_card(fin, evals, out.name), encoding="utf-8")
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        if out.exists():  # appeared while we copied: keep it, drop ours
            raise AttrctlError(f"{out} appeared during the export; nothing of it was changed")
    return ExportResult(out, files, fin.heads_dir is not None, [e.name for e in evals])


# ------------------------------------------------------------------------------ checks
def check_model_folder(folder: Path) -> None:
    """A complete transformers folder with merged weights: config, safetensors weights whose
    tensor names carry no LoRA adapter, no adapter files.

    Raises:
        AttrctlError: naming what is wrong.
    """
    adapters = [n for n in _ADAPTER_FILES if (folder / n).exists()]
    if adapters:
        raise AttrctlError(
            f"{folder}: holds LoRA adapter files ({', '.join(adapters)}), not a merged model; "
            "a finished run's model/final is merged — was it written by another tool?"
        )
    weights = sorted(folder.glob("*.safetensors"))
    if not (folder / "config.json").is_file() or not weights:
        raise AttrctlError(
            f"{folder}: not a transformers model folder (config.json + *.safetensors)"
        )
    for w in weights:
        lora = [k for k in safetensors_keys(w) if "lora_" in k or ".base_layer." in k]
        if lora:
            raise AttrctlError(
                f"{w}: {len(lora)} tensors are LoRA adapter weights (e.g. {lora[0]!r}); the "
                "model is not merged"
            )


def safetensors_keys(path: Path) -> list[str]:
    """Tensor names in a safetensors file, from its JSON header (no tensor is read)."""
    try:
        with path.open("rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
    except (OSError, struct.error, ValueError) as err:
        raise AttrctlError(f"{path}: unreadable safetensors header ({err})") from None
    return [k for k in header if k != "__metadata__"]


def _write_generation_config(folder: Path) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in cfg}
    (folder / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


# ------------------------------------------------------------------------------ the card
def model_card(run: FinishedRun, evals: list[Path], name: str) -> str:
    """The exported folder's README.md (Hugging Face model-card front matter + Markdown)."""
    policy = _policy_data(run.policy_path)
    attrs = policy.get("attributes") or []
    title = policy.get("name", run.root.name)
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags: [attrctl, attribute-control, nado]",
        "---",
        "",
        f"# {title} — attrctl export",
        "",
    ]
    if policy.get("description"):
        lines += [" ".join(str(policy["description"]).split()), ""]
    lines += [
        f"Fine-tuned from `{policy.get('model', '?')}` with attrctl under "
        f"the policy `{title}`: attribute-controlled fine-tuning (CE + λ_d · KL(q ‖ p) with NADO "
        "regularizer heads; Meng et al., Findings of EMNLP 2024, arXiv 2410.05559).",
        "",
        "## Attributes",
        "",
        "| attribute | oracle | weight w_k | head |",
        "|---|---|---|---|",
    ]
    for a in attrs:
        head = a.get("head") or {}
        shape = head.get("kind", "?") + (f", rank {head['rank']}" if head.get("rank") else "")
        kind = (a.get("oracle") or {}).get("kind", "?")
        lines.append(f"| {a.get('name', '?')} | {kind} | {a.get('weight', 1.0)} | {shape} |")
    lines += ["", "## Training", "", *_training_lines(run, policy), "", "## Evaluation", ""]
    lines += _eval_lines(evals)
    lines += [
        "",
        "## Use",
        "",
        "With transformers alone (attrctl is not needed):",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{name}")',
        f'tok = AutoTokenizer.from_pretrained("{name}")',
        'enc = tok(["The weather today is"], return_tensors="pt")',
        "print(tok.decode(model.generate(**enc, max_new_tokens=30)[0]))",
        "```",
        "",
    ]
    if run.heads_dir is not None:
        lines += [
            "Guided (NADO) decoding with the run's regularizer heads in `heads/` needs attrctl "
            "(`log q = ℓ + Σ_k w_k logσ(r_k)` at each step):",
            "",
            "```python",
            "from transformers import LogitsProcessorList",
            "from attrctl.guided import load_guidance",
            "",
            f'with load_guidance("{name}", model) as proc:',
            "    out = model.generate(**enc, max_new_tokens=30, do_sample=True,",
            "                         logits_processor=LogitsProcessorList([proc]))",
            "```",
            "",
            f'or from the shell: `attrctl generate {name} "The weather today is" --guided -n 4`.',
            "",
        ]
    else:
        lines += ["The run fitted no regularizer heads, so there is no `heads/` folder.", ""]
    lines += [
        "## Files",
        "",
        "- `config.json`, `model.safetensors`, tokenizer files, `generation_config.json`: the "
        "model (LoRA adapters, if any, merged)",
        "- `heads/`: the last fitted regularizer heads (`heads.safetensors`, `heads.json`)"
        if run.heads_dir is not None
        else "- no `heads/`: the run fitted no heads",
        "- `policy.yaml`: the resolved policy the run trained under",
        *(f"- `{e.name}`: an `attrctl eval` result" for e in evals),
        "",
        "The oracles and judge behind the numbers are small classifiers that catch explicit "
        "toxicity and miss implicit hate; read the numbers with that in mind.",
        "",
    ]
    return "\n".join(lines)


def _policy_data(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise AttrctlError(f"{path}: cannot read the run's policy ({err})") from None
    return data if isinstance(data, dict) else {}


def _training_lines(run: FinishedRun, policy: dict[str, Any]) -> list[str]:
    from attrctl.train.summary import summary

    ft = policy.get("finetune") or {}
    sched = policy.get("schedule") or {}
    reg = policy.get("regularization") or {}
    method = ft.get("method", "?")
    if method == "top_layers":
        method += f" (top {ft.get('top_layers')})"
    elif method == "lora":
        method += f" (r {(ft.get('lora') or {}).get('r')}, merged)"
    lines = [
        f"- schedule: {sched.get('mode', '?')}, {sched.get('iterations', '?')} iteration(s) of "
        f"{ft.get('steps', '?')} steps, batch {ft.get('batch_size', '?')} × "
        f"{ft.get('seq_len', '?')} tokens, learning rate {ft.get('learning_rate', '?')}; "
        f"fine-tuning {method}",
        f"- λ: {reg.get('lam', '?')} globally; per domain: {_per_domain(reg.get('per_domain'))}",
    ]
    s = summary(RunDir(run.root))
    if s["lambdas"]:
        lines.append(f"- λ resolved from the data: {s['lambdas'].get('lam_by_domain')}")
    for t in s["finetunes"]:
        if "ce_first" in t and "ce_last" in t:
            lines.append(
                f"- θ_{t.get('iteration')}: CE {t['ce_first']:.3f} → {t['ce_last']:.3f}, KL "
                f"{t.get('kl_last', float('nan')):.4f} (heads R_{t.get('heads')})"
            )
    for f in s["fits"]:
        for head, m in (f.get("heads") or {}).items():
            auc = m.get("auc")
            auc_s = "n/a" if not isinstance(auc, (int, float)) or auc != auc else f"{auc:.3f}"
            if m.get("held_out") == 0:  # too few prompts to hold any out
                note = (f.get("held_out") or {}).get("note", "none held out")
                lines.append(f"- head R_{f.get('iteration')} ({head}): AUC not measured ({note})")
                continue
            if "held_out_prompts" in m:  # split by prompt: no held-out prompt was fitted on
                on = f"{m['held_out_prompts']} held-out prompts ({m['held_out']} sequences)"
            else:  # a run of an earlier version (sequences held out, their prompts not)
                on = f"{m.get('held_out', '?')} held-out sequences"
            lines.append(f"- head R_{f.get('iteration')} ({head}): AUC {auc_s} on {on}")
    before, after = s["before"], s["after"]
    if before and after:
        for attr, b in (before.get("violation_rate") or {}).items():
            a = (after.get("violation_rate") or {}).get(attr)
            if a is not None:
                lines.append(
                    f"- {attr} violation rate of the model's own samples (oracle): {b:.1%} "
                    f"(base) → {a:.1%} (final), {before.get('rows', '?')} continuations"
                )
        if "judge_violation_rate" in before and "judge_violation_rate" in after:
            lines.append(
                f"- judged by the independent judge: {before['judge_violation_rate']:.1%} → "
                f"{after['judge_violation_rate']:.1%}"
            )
    if s["role_seconds"]:
        times = ", ".join(f"{r} {v:.0f} s" for r, v in sorted(s["role_seconds"].items()))
        lines.append(f"- wall time per role: {times}")
    return lines


def _per_domain(value: Any) -> str:
    if isinstance(value, dict) and value:
        return ", ".join(f"{d} {v:g}" if isinstance(v, (int, float)) else f"{d} {v}"
                         for d, v in value.items())  # fmt: skip
    return str(value) if value else "none (one λ everywhere)"


def _eval_lines(evals: list[Path]) -> list[str]:
    if not evals:
        return ["No `attrctl eval` result was in the run directory when this was exported."]
    from attrctl.report import build_report

    try:
        return [build_report(evals).markdown]
    except AttrctlError as err:  # a broken eval file must not block the export; say so
        return [f"The eval results could not be read: {err}"]
