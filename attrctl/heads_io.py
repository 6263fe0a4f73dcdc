"""The regularizer heads on disk: ``heads.safetensors`` (keys ``<k>.<param>``) and ``heads.json``.

A fitted R_i lives in ``heads/iter_<i>/`` of a run directory (and ``heads/`` of an export);
:func:`load_heads` builds the policy's heads (:mod:`attrctl.heads`) and reads them in, or leaves
them at their zero init (R_0).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from attrctl.errors import AttrctlError
from attrctl.paths import atomic_dir
from attrctl.policy.compile import CompiledPolicy
from attrctl.train.weights import read_safetensors


def save_heads(heads: torch.nn.ModuleList, folder: Path, meta: dict[str, Any]) -> None:
    """Publish heads (one safetensors, keys ``<k>.<param>``) and their meta JSON, which should
    name the attributes in order (``attributes``) so a reordered policy cannot load them swapped."""
    state = {f"{i}.{k}": v.detach().clone().contiguous() for i, h in enumerate(heads)
             for k, v in h.state_dict().items()}  # fmt: skip
    with atomic_dir(folder) as tmp:
        save_file(state, str(tmp / "heads.safetensors"))
        (tmp / "heads.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def _state_mismatch(want: dict, got: dict, err: Exception) -> str:
    """The first difference between a module's state dict and the tensors read for it."""
    for key, tensor in want.items():
        if key not in got:
            return f"tensor {key!r} is missing"
        if tuple(got[key].shape) != tuple(tensor.shape):
            return (
                f"tensor {key!r} has shape {list(got[key].shape)}, this model needs "
                f"{list(tensor.shape)}"
            )
    extra = sorted(set(got) - set(want))
    if extra:
        return f"unexpected tensor {extra[0]!r}"
    return str(err).splitlines()[0]


def load_heads(compiled: CompiledPolicy, model: Any, folder: Path | None) -> torch.nn.ModuleList:
    """The policy's heads: zero-initialised when ``folder`` is None (R_0), else read from it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(compiled.policy.seed + 7919)  # head init does not disturb other RNG
        heads = compiled.build_heads(model)
    if folder is not None:
        tensors = read_safetensors(folder / "heads.safetensors", "head weights")
        held = {k.split(".", 1)[0] for k in tensors}
        if held != {str(i) for i in range(len(heads))}:
            raise AttrctlError(
                f"{folder / 'heads.safetensors'}: holds {len(held)} heads but the policy has "
                f"{len(heads)} attributes"
            )
        meta_path = folder / "heads.json"
        names = [a.name for a in compiled.attributes]
        saved = None
        if meta_path.exists():
            from attrctl.train.rundir import read_json

            meta = read_json(meta_path, "the heads' metadata")
            saved = meta.get("attributes") if isinstance(meta, dict) else None
        if saved is not None and saved != names:
            raise AttrctlError(
                f"{meta_path}: heads of attributes {saved}, but the policy's are {names}"
            )
        for i, head in enumerate(heads):
            sub = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.split(".")[0] == str(i)}
            try:
                head.load_state_dict(sub, strict=True)
            except RuntimeError as err:
                raise AttrctlError(
                    f"{folder / 'heads.safetensors'}: head {i} ({names[i]}) does not fit this "
                    f"model and policy: {_state_mismatch(head.state_dict(), sub, err)}. Heads "
                    "are fitted on one model's hidden states and vocabulary: use them with that "
                    "model or one of the same architecture"
                ) from None
    heads.eval()
    for p in heads.parameters():
        p.requires_grad_(False)
    return heads
