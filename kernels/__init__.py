"""Triton kernels of the regularized losses (the ``triton`` impl of ``attrctl.losses``).

One kernel per module, each layered ``_op_*_kernel`` → ``op_forward``/``op_backward`` launcher →
``OpFunction(torch.autograd.Function)`` → the function below:

* ``token_kl`` (``kl.py``; not ``token_kl.py``, which would shadow this function once imported) — KL(q_t ‖ p_t) per row from given logits.
* ``regularized_lm_loss`` (``fused_linear_reg.py``) — fused-linear CE + λ_t·KL from hidden
  states: torch matmuls per row chunk, one Triton sweep per row for the losses and the logits
  gradient.
* ``head_fit_loss`` (``head_fit.py``) — the NADO head loss, fused the same way.

The signatures are the internal ones of the loss contract (inputs already normalised by the
dispatcher). Importing this package does **not** import Triton: the kernel modules load on the
first call, and Triton decides at that moment whether to compile for the GPU or to run the CPU
interpreter (``TRITON_INTERPRET=1``), so set that variable before the first call.
:func:`triton_support` tells the dispatcher whether the kernels can run, and why not.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING


def _defer_to_installed_kernels() -> None:
    """Replace this module, imported under the top-level name ``kernels``, by the real one.

    This folder is the package ``attrctl.kernels`` (pyproject's ``package-dir``), but it also sits
    at the top of the repository, so whenever the repo root is on ``sys.path`` — ``python -m …``
    or ``python -c`` or a notebook started there, the parallel roles (``python -m
    attrctl.train.role``) and ``torchrun -m attrctl.cli`` launched there — ``import kernels`` finds
    it before the PyPI ``kernels`` package in site-packages. transformers probes that package
    (``find_spec("kernels")`` plus the installed distribution's version) and, if it is there,
    runs ``from kernels import CUDAProperties, …``, which then failed with an ImportError.

    So, imported as ``kernels``, this file finds what ``import kernels`` would have found without
    the repo root on ``sys.path`` and puts it in ``sys.modules``; the import returns that module,
    not this one (CPython returns ``sys.modules[name]`` after executing a module). Other fixes
    were weaker: renaming the folder breaks the layout; a hook in ``attrctl/__init__.py`` misses
    every session that imports transformers without attrctl; running subprocesses outside the
    repo leaves the user's own commands broken; and raising ImportError here would make
    transformers' probe (which has already seen the spec and the installed version) fail too.
    If no other ``kernels`` is installed, this module stays as it is: it has no ``__version__``,
    so transformers counts hub kernels as unavailable, as it would without the repo root.
    """
    import importlib.machinery
    import importlib.util
    import os

    root = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))  # the folder above kernels/
    here = os.path.join(root, "kernels")

    def ours(p: str | None) -> bool:
        return p is not None and os.path.realpath(p).startswith(here + os.sep)

    # "" on sys.path is the current directory
    path = [p for p in sys.path if not (isinstance(p, str) and os.path.realpath(p or ".") == root)]
    for finder in sys.meta_path:  # the usual import search, minus the repo root
        find = getattr(finder, "find_spec", None)
        if find is None:
            continue
        spec = find("kernels", path if finder is importlib.machinery.PathFinder else None)
        if spec is None or spec.loader is None or ours(spec.origin):
            continue
        module = importlib.util.module_from_spec(spec)
        sys.modules["kernels"] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop("kernels", None)
            raise
        return


if __name__ == "kernels":  # never when imported as attrctl.kernels
    _defer_to_installed_kernels()

# after the check above: imported as `kernels`, nothing of attrctl should run before it
from attrctl.kernels._utils import KernelConfig, triton_support  # noqa: E402

if TYPE_CHECKING:
    import torch

    from attrctl.losses.types import HeadFitOutput, LossOptions, LossOutput, RegHead


def token_kl(
    logits: torch.Tensor,
    reg_logits: torch.Tensor,
    attr_weights: torch.Tensor,
    ref_logits: torch.Tensor | None,
    mask: torch.Tensor | None,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """KL(q_t ‖ p_t) per row; see :func:`attrctl.kernels.kl.token_kl`."""
    from attrctl.kernels.kl import token_kl as impl

    return impl(logits, reg_logits, attr_weights, ref_logits, mask, config)


def regularized_lm_loss(
    hidden: torch.Tensor,
    lm_weight: torch.Tensor,
    labels: torch.Tensor,
    heads: list[RegHead],
    attr_weights: torch.Tensor,
    lam: torch.Tensor,
    opts: LossOptions,
    config: KernelConfig | None = None,
) -> LossOutput:
    """Fused-linear CE + λ_t·KL; see :func:`attrctl.kernels.fused_linear_reg.regularized_lm_loss`."""
    from attrctl.kernels.fused_linear_reg import regularized_lm_loss as impl

    return impl(hidden, lm_weight, labels, heads, attr_weights, lam, opts, config)


def head_fit_loss(
    hidden: torch.Tensor,
    lm_weight: torch.Tensor,
    head_states: torch.Tensor,
    head_weight: torch.Tensor,
    head_bias: torch.Tensor | None,
    tokens: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    pair_mask: torch.Tensor,
    mu: float,
    opts: LossOptions,
    config: KernelConfig | None = None,
) -> HeadFitOutput:
    """The NADO head loss; see :func:`attrctl.kernels.head_fit.head_fit_loss`."""
    from attrctl.kernels.head_fit import head_fit_loss as impl

    return impl(
        hidden, lm_weight, head_states, head_weight, head_bias, tokens, labels, mask, pair_mask,
        mu, opts, config,
    )  # fmt: skip


__all__ = ["KernelConfig", "head_fit_loss", "regularized_lm_loss", "token_kl", "triton_support"]
