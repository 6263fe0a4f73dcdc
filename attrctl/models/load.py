"""``load_model(spec)``: resolve a model spec and hand it to the right loader."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from attrctl.errors import AttrctlError
from attrctl.models.loaded import LoadedModel, finish, no_hf_progress_bar

# the registry of built-in models; the names stay importable from here
from attrctl.models.registry import BUNDLED as BUNDLED
from attrctl.models.registry import TINY_RANDOM as TINY_RANDOM
from attrctl.models.registry import BundledModel as BundledModel

if TYPE_CHECKING:
    import torch

TINY_TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "assets" / "tiny-tokenizer"
TINY_SEED = 1234


def load_model(spec: str, *, dtype: torch.dtype | None = None, device: str = "cpu") -> LoadedModel:
    """Load a causal LM and its tokenizer from a model spec.

    Args:
        spec: ``bundled:<name>``, ``tiny-random``, a hub id, a local folder, or a ``.gguf`` file.
        dtype: parameter dtype (default ``torch.float32``).
        device: where to put the model (``"cpu"``, ``"cuda"``, ``"cuda:1"``…).

    Returns:
        A :class:`LoadedModel` in eval mode whose tokenizer has a pad token and left padding.

    Raises:
        AssetError: a bundled model's package is not installed (the message says what to install).
        AttrctlError: the spec names nothing loadable (unknown bundled name, missing folder,
            hub unreachable or repository not found).
    """
    import torch

    dtype = torch.float32 if dtype is None else dtype
    spec = spec.strip()
    if spec.startswith("bundled:"):
        from attrctl.models.gguf import load_bundled

        name = spec.split(":", 1)[1]
        if name not in BUNDLED:
            known = ", ".join(f"bundled:{n}" for n in BUNDLED)
            raise AttrctlError(f"unknown bundled model {name!r}; bundled models: {known}")
        return load_bundled(spec, BUNDLED[name], dtype=dtype, device=device)
    if spec == TINY_RANDOM:
        return load_tiny_random(dtype=dtype, device=device)
    return load_pretrained(spec, dtype=dtype, device=device)


def tiny_random_config(vocab_size: int, **token_ids: int):
    """The ``tiny-random`` architecture: a 2-layer Llama, hidden 64, tied embeddings."""
    from transformers import LlamaConfig

    return LlamaConfig(
        architectures=["LlamaForCausalLM"],
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, as in SmolLM2, so the code path matches
        max_position_embeddings=512,
        tie_word_embeddings=True,
        **token_ids,
    )


def load_tiny_random(*, dtype: torch.dtype, device: str) -> LoadedModel:
    """The ``tiny-random`` model: seeded random weights, identical on every call and machine."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(TINY_TOKENIZER_DIR))
    config = tiny_random_config(
        len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    # fork_rng: seed the init without disturbing the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = LlamaForCausalLM(config)
    model.to(dtype=dtype)
    finish(model, tok, device)
    return LoadedModel(model=model, tokenizer=tok, spec=TINY_RANDOM, source="random")


def _looks_like_path(spec: str) -> bool:
    return spec.startswith(("./", "../", "/", "~")) or Path(spec).expanduser().exists()


def load_pretrained(spec: str, *, dtype: torch.dtype, device: str) -> LoadedModel:
    """A hub id or a local folder (``config.json`` + weights) or ``.gguf`` file."""
    if _looks_like_path(spec):
        path = Path(spec).expanduser().resolve()
        if not path.exists():
            raise AttrctlError(f"model: local path does not exist: {path}")
        ggufs = sorted(path.glob("*.gguf")) if path.is_dir() else []
        if path.suffix == ".gguf" or (not (path / "config.json").exists() and len(ggufs) == 1):
            from attrctl.models.gguf import load_gguf_file

            return load_gguf_file(spec, path if path.is_file() else ggufs[0], dtype, device)
        if not (path / "config.json").exists():
            raise AttrctlError(
                f"model: {path} has no config.json; expected a transformers model folder "
                "(save_pretrained output) or a single .gguf file"
            )
        source = str(path)
    else:
        source = spec
    return _from_pretrained(spec, source, dtype=dtype, device=device)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub endpoint (``$HF_ENDPOINT`` or huggingface.co) accepts a TCP connection.

    Without this probe an offline machine spends ~50 s in huggingface_hub's retries before the
    inevitable failure; with it, we go straight to the local hub cache.
    """
    import os
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((url.hostname or "", port), timeout=timeout).close()
    except OSError:
        return False
    return True


def _from_pretrained(spec: str, source: str, *, dtype: torch.dtype, device: str) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Offline, a hub id can still load from the local hub cache (local_files_only).
    offline = source == spec and not _looks_like_path(spec) and not hub_reachable()
    try:
        with no_hf_progress_bar():
            tok = AutoTokenizer.from_pretrained(source, local_files_only=offline)
            model = AutoModelForCausalLM.from_pretrained(
                source, dtype=dtype, local_files_only=offline
            )
    except ValueError as err:
        if "Unrecognized configuration class" in str(err):  # e.g. an encoder-decoder model
            raise AttrctlError(
                f"model {spec!r}: {_config_name(err)} is not a causal language model "
                "(AutoModelForCausalLM has no class for it); attrctl fine-tunes decoder-only "
                "causal LMs (docs/models-data.md, 'Architectures')"
            ) from err
        raise AttrctlError(_pretrained_failure(spec, err, offline=offline)) from err
    except Exception as err:  # hub/network/format errors come in many classes; all are user-facing
        raise AttrctlError(_pretrained_failure(spec, err, offline=offline)) from err
    finish(model, tok, device)
    return LoadedModel(model=model, tokenizer=tok, spec=spec, source=source)


def _config_name(err: Exception) -> str:
    """``T5Config`` from transformers' "Unrecognized configuration class <class '….T5Config'>"."""
    import re

    found = re.search(r"\.(\w+Config)'>", str(err))
    return found.group(1) if found else "its configuration"


def _pretrained_failure(spec: str, err: Exception, *, offline: bool) -> str:
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    if len(first) > 300:
        first = first[:300] + "…"
    msg = f"could not load model {spec!r}: {type(err).__name__}: {first}"
    if offline:
        msg += (
            "\n  hint: the Hugging Face hub is unreachable from here (or HF_HUB_OFFLINE is set) and "
            "this model is not in the local hub cache; offline, use "
            "`bundled:smollm2-135m-instruct`, `tiny-random`, or a local folder written by "
            "save_pretrained"
        )
    return msg + "\n  (run with --debug for the full traceback)"
