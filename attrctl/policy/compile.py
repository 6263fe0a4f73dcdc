"""``compile_policy``: the one place a validated policy becomes objects.

A :class:`CompiledPolicy` holds what the training loop and the data tools consume: each
attribute's built oracle and label rule, the composition weights ``w_k``, the per-domain
regularization strengths ``λ_d``, the run directory, and factories for what needs a loaded model
or its parameters — the regularizer heads (:meth:`CompiledPolicy.build_heads`), the optimizers
(:meth:`CompiledPolicy.finetune_optimizer`, :meth:`CompiledPolicy.head_optimizer`) — plus the
schedule. One small ``_build_*`` function per component keeps each translation visible.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from attrctl.oracles import Oracle, build_oracle
from attrctl.policy.schema import Attribute, HeadSpec, Policy, Schedule, Target

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class CompiledAttribute:
    """An attribute ready to label texts: its oracle, label rule, weight and head spec."""

    name: str
    oracle: Oracle
    target: Target
    weight: float
    head: HeadSpec

    def labels(self, scores: np.ndarray) -> np.ndarray:
        """NADO labels y ∈ [0, 1] ("satisfies the attribute") from violation scores ``[n]``."""
        scores = np.asarray(scores, dtype=np.float64)
        if self.target.labels == "soft":
            return 1.0 - scores
        return (scores < self.target.max_violation).astype(np.float64)


@dataclass(frozen=True)
class CompiledPolicy:
    policy: Policy
    attributes: tuple[CompiledAttribute, ...]
    lam_by_domain: dict[str, float]
    default_lam: float
    run_dir: Path
    schedule: Schedule

    @property
    def attr_weights(self) -> list[float]:
        """w_k of every attribute, in policy order."""
        return [a.weight for a in self.attributes]

    def lam_for(self, domain: str) -> float:
        """λ_d: the domain's own strength under adaptive regularization, else the global λ."""
        return self.lam_by_domain.get(domain, self.default_lam)

    @property
    def auto_lambdas(self) -> bool:
        """Whether λ_d is to be set from the data (``per_domain: auto``)."""
        return self.policy.regularization.per_domain == "auto"

    @property
    def torch_dtype(self) -> torch.dtype:
        """The model's parameter dtype in every job (``policy.dtype``)."""
        import torch

        return getattr(torch, self.policy.dtype)

    def autocast(self, device: str):
        """The fine-tune's forward context: bf16 autocast under ``finetune.mixed_precision``."""
        import contextlib

        import torch

        if self.policy.finetune.mixed_precision == "bf16":
            return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def build_heads(self, model: Any) -> torch.nn.ModuleList:
        """One zero-initialised regularizer head per attribute, sized for ``model``."""
        from attrctl.heads import build_heads

        return build_heads([a.head for a in self.attributes], model, self.policy.finetune)

    def finetune_optimizer(self, params) -> torch.optim.Optimizer:
        """AdamW over the LLM's trainable parameters, as ``finetune`` says."""
        import torch

        ft = self.policy.finetune
        return torch.optim.AdamW(params, lr=ft.learning_rate, weight_decay=ft.weight_decay)

    def head_optimizer(self, params) -> torch.optim.Optimizer:
        """AdamW over the heads' parameters, as ``regularizer`` says."""
        import torch

        return torch.optim.AdamW(params, lr=self.policy.regularizer.learning_rate)


def compile_policy(policy: Policy) -> CompiledPolicy:
    """Build every component a policy names (oracles are loaded here)."""
    domains = sorted({source.domain for source in policy.data})
    return CompiledPolicy(
        policy=policy,
        attributes=tuple(_build_attribute(a, policy.base_dir) for a in policy.attributes),
        lam_by_domain=_build_lams(policy, domains),
        default_lam=policy.regularization.lam,
        run_dir=_build_run_dir(policy),
        schedule=policy.schedule,
    )


def _build_attribute(attr: Attribute, base_dir: Path) -> CompiledAttribute:
    return CompiledAttribute(
        name=attr.name,
        oracle=build_oracle(attr.oracle, base_dir=base_dir),
        target=attr.target,
        weight=attr.weight,
        head=attr.head,
    )


def _build_lams(policy: Policy, domains: list[str]) -> dict[str, float]:
    # Every domain gets an explicit λ_d so logs show what adaptive regularization resolved to.
    return {d: policy.lam_for(d) for d in domains}


def _build_run_dir(policy: Policy) -> Path:
    return Path(policy.run_dir).expanduser().resolve()
