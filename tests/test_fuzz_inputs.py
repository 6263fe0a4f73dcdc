"""Every input attrctl reads, fuzzed with generated cases (hypothesis) rather than a hand-picked list.

Surfaces: policy YAML (random mutations of the shipped policies), ``--set`` expressions, data
files in each format, prompt files, synth jsonl files, run directories and checkpoints. For every
generated case the promise is: the command — or the library function the command calls — ends
in success or in one :class:`~attrctl.errors.AttrctlError` (exit 2) whose message names the file,
and the line or field where there is one; never another exception (a traceback), never a hang
(each case runs under an alarm), never a write to an input.

Profiles (tests/conftest.py): ``ci`` runs a fixed set of cases (derandomized); the ``long``
variant of each test (marked ``fuzz_long`` and ``slow``) runs LONG× as many random ones::

    .venv/bin/pytest -m fuzz_long tests/test_fuzz_inputs.py

Inputs that broke attrctl when hypothesis found them are kept at the bottom as regression tests.
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
import signal
import struct
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from attrctl.errors import AttrctlError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHIPPED = ("toxicity.yaml", "toxicity_sentiment.yaml", "no_pii.yaml")
LONG = 20  # the long profile runs this many times the CI profile's cases
PROFILES = ["ci", pytest.param("long", marks=[pytest.mark.fuzz_long, pytest.mark.slow])]
CASES: dict[str, int] = {}  # cases run per surface in this session (printed by each test)


def fuzz(profile: str, n: int):
    """Settings of one fuzz test: ``n`` cases under ``ci``, LONG·n under ``long``."""
    return settings(
        settings.get_profile(profile), max_examples=n * (LONG if profile == "long" else 1)
    )


class Hang(BaseException):
    """A case ran past its time limit (BaseException: no `except Exception` can swallow it)."""


@contextlib.contextmanager
def time_limit(seconds: float = 60.0):
    def on_alarm(*_):
        raise Hang(f"a case ran longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def snapshot(folder: Path) -> dict[str, bytes | str]:
    out: dict[str, bytes | str] = {}
    for p in sorted(folder.rglob("*")):
        key = str(p.relative_to(folder))
        if p.is_symlink():
            out[key] = f"-> {p.readlink()}"
        elif p.is_file():
            out[key] = p.read_bytes()
        else:
            out[key] = "dir"
    return out


def count(surface: str) -> None:
    CASES[surface] = CASES.get(surface, 0) + 1


def report(surface: str, minimum: int) -> None:
    print(f"fuzz {surface}: {CASES.get(surface, 0)} generated cases")
    assert CASES.get(surface, 0) >= minimum, "the fuzzer ran fewer cases than it should"


# ============================================================================ shared strategies
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from(
        ["", "~", "null", "yes", "1e3", "0x10", ".inf", "-.nan", "2001-12-14", "toxic",
         "bundled:nope", "../x", "~nobody_attrctl/x", "a" * 300, "a\x00b", "kind", "linear"]
    ),
)  # fmt: skip
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=8,
)
OUT_OF_RANGE = [-1, 0, -1e308, 1e308, 2**64, 10**30, 1.5, -0.0, float("inf"), float("nan"), 2**32]


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


def _get(node, path):
    for part in path:
        node = node[part]
    return node


def mutate_data(draw, doc):
    """One structural mutation of a parsed document: drop, rename, retype, push out of range,
    or duplicate a list item, at a random place."""
    path = draw(st.sampled_from(list(_paths(doc))))
    op = draw(st.sampled_from(["drop", "rename", "retype", "range", "dup_item"]))
    if not path:
        return draw(VALUES) if op == "retype" else doc
    parent, key = _get(doc, path[:-1]), path[-1]
    if op == "drop":
        del parent[key]
    elif op == "rename" and isinstance(parent, dict):
        typo = draw(st.sampled_from(["drop", "swap", "add"]))
        k = str(key)
        i = draw(st.integers(0, max(len(k) - 1, 0)))
        new = {"drop": k[:i] + k[i + 1 :], "swap": k[i + 1 : i + 2] + k[i : i + 1],
               "add": k[:i] + "x" + k[i:]}[typo]  # fmt: skip
        if typo == "swap":
            new = k[:i] + new + k[i + 2 :]
        new = draw(st.one_of(st.just(new), st.text(min_size=1, max_size=12)))
        parent[new] = parent.pop(key)
    elif op == "range":
        parent[key] = draw(st.sampled_from(OUT_OF_RANGE))
    elif op == "dup_item" and isinstance(parent, list):
        parent.insert(key, copy.deepcopy(parent[key]))
    else:
        parent[key] = draw(VALUES)
    return doc


TAGS = ["!!python/object/apply:os.system ['echo pwned']", "!!python/name:os.system", "!!binary aGk=",
        "!!set {a, b}", "!!timestamp 2001-12-14", "!custom x", "!!float 1", "!!int x",
        "!!omap [a: 1]", "!!str", "!!null ''", "!!bool maybe", "!!map [1]"]  # fmt: skip
CONTROL = ["\x00", "\x01", "\x07", "\x08", "\x0b", "\x0c", "\x1b", "\x7f", "\x85", "\u2028",
           "\ufeff", "\ufffe", "\U0001f600"]  # fmt: skip
NOT_UTF8 = [b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80", b"\xfe\xff", b"\xf4\x90\x80\x80"]
KEY_LINE = re.compile(rb"^\s*[A-Za-z_][\w-]*:")


def mutate_text(draw, data: bytes) -> bytes:
    """One textual mutation: a duplicated key, deep nesting, aliases, tags, control characters,
    bytes that are not UTF-8, truncation, a flipped byte, a huge file, line-ending changes."""
    op = draw(st.sampled_from(["dup_key", "deep_flow", "deep_block", "alias_bomb", "alias_cycle",
                               "tag", "control", "not_utf8", "truncate", "flip", "huge", "bom",
                               "crlf", "tab"]))  # fmt: skip
    lines = data.split(b"\n")
    pos = draw(st.integers(0, len(data)))
    keyed = [i for i, line in enumerate(lines) if KEY_LINE.match(line)]
    if op == "dup_key" and keyed:
        i = draw(st.sampled_from(keyed))
        at = draw(st.sampled_from([i + 1, len(lines)]))
        lines.insert(at, lines[i] if at == i + 1 else lines[i].lstrip())
        return b"\n".join(lines)
    if op == "deep_flow":
        depth = draw(st.sampled_from([10, 63, 64, 65, 200, 5_000, 100_000]))
        return data + b"\ndeep: " + b"[" * depth + b"]" * depth + b"\n"
    if op == "deep_block":
        depth = draw(st.sampled_from([10, 64, 65, 300]))
        nest = b"".join(b"  " * d + b"a:\n" for d in range(depth)) + b"  " * depth + b"1\n"
        return data + b"\ndeep:\n" + b"".join(b"  " + line + b"\n" for line in nest.splitlines())
    if op == "alias_bomb":
        levels = draw(st.integers(1, 9))
        anchors = [b"bomb:", b"  - &a0 [x, x, x, x, x, x, x, x, x]"]
        for k in range(1, levels + 1):
            anchors.append(b"  - &a%d [" % k + b", ".join([b"*a%d" % (k - 1)] * 9) + b"]")
        target = draw(st.sampled_from([b"description: *a%d" % levels, b"seed: *a%d" % levels]))
        return b"\n".join([*anchors, data, target]) + b"\n"
    if op == "alias_cycle":
        return data + draw(st.sampled_from([b"\ncycle: &c [*c]\n", b"\ncycle: &m {a: *m}\n"]))
    if op == "tag" and keyed:
        i = draw(st.sampled_from(keyed))
        key = lines[i].split(b":", 1)[0]
        lines[i] = key + b": " + draw(st.sampled_from(TAGS)).encode()
        return b"\n".join(lines)
    if op == "control":
        return data[:pos] + draw(st.sampled_from(CONTROL)).encode("utf-8") + data[pos:]
    if op == "not_utf8":
        return data[:pos] + draw(st.sampled_from(NOT_UTF8)) + data[pos:]
    if op == "truncate":
        return data[:pos]
    if op == "flip" and data:
        i = min(pos, len(data) - 1)
        return data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1 :]
    if op == "huge":
        kind = draw(st.sampled_from(["over", "scalar"]))
        if kind == "over":  # past the 1 MiB bound: refused before parsing
            return data + b"\n# " + b"x" * (2**20) + b"\n"
        return data + b"\ndescription_long: " + b"y" * (2**20 - len(data) - 64) + b"\n"
    if op == "bom":
        return b"\xef\xbb\xbf" + data
    if op == "crlf":
        return data.replace(b"\n", b"\r\n")
    if op == "tab" and keyed:
        i = draw(st.sampled_from(keyed))
        lines[i] = b"\t" + lines[i].lstrip()
        return b"\n".join(lines)
    return data


# ================================================================================= policy YAML
def _shipped_docs() -> list[dict]:
    docs = [yaml.safe_load((REPO / "policies" / name).read_text()) for name in SHIPPED]
    docs.append(
        {
            "name": "minimal",
            "data": [{"kind": "bundled", "name": "shakespeare", "domain": "general"}],
            "attributes": [{"name": "tox", "oracle": {"kind": "lexicon", "words": ["idiot"]}}],
        }
    )
    return docs


DOCS = _shipped_docs()


@st.composite
def policy_files(draw) -> bytes:
    """A shipped policy with 0-3 structural and 0-2 textual mutations, as file bytes."""
    doc = copy.deepcopy(draw(st.sampled_from(DOCS)))
    for _ in range(draw(st.integers(0, 3))):
        doc = mutate_data(draw, doc)
    data = yaml.safe_dump(doc, sort_keys=False, allow_unicode=True).encode("utf-8")
    for _ in range(draw(st.integers(0, 2))):
        data = mutate_text(draw, data)
    return data


# A problem names a place: a YAML position, a field path (optionally with its line or --set), or
# it is about the whole file.
_PLACE = re.compile(r"\bline \d+|^(\S+|\[.*?\]\S*|\(top level\))( \((line \d+|from --set .*)\))?: ")
_WHOLE_FILE = ("the file is empty", "a policy is a YAML mapping", "larger than", "more problems",
               "cannot read", "not a usable file name")  # fmt: skip


def assert_clean(code: int, out: str, err: str, source: str) -> None:
    """Exit 0, or exit 2 with a message that names ``source`` and a place in it; no traceback."""
    text = out + err
    assert code in (0, 2), f"exit {code}:\n{text[-3000:]}"
    assert "Traceback" not in text
    if code == 2 and "Usage:" not in err:  # click's own usage errors name the option
        assert source in err, f"the message does not name {source}:\n{err[:3000]}"
        lines = err.split("\n")
        problems = [line[4:] for line in lines if line.startswith("  - ")]
        if "(--set " in lines[0]:
            return  # the problem is in the named --set value itself
        for problem in problems:
            assert _PLACE.search(problem) or any(w in problem for w in _WHOLE_FILE), problem


def check_policy_file(run_cli, data: bytes) -> None:
    count("policy YAML")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "policy.yaml"
        path.write_bytes(data)
        before = snapshot(Path(tmp))
        with time_limit(60):
            code, out, err = run_cli("policy", "validate", str(path))
        assert snapshot(Path(tmp)) == before, "validation wrote to the policy's folder"
    assert_clean(code, out, err, str(path))


@pytest.mark.parametrize("profile", PROFILES)
def test_fuzz_policy_files(run_cli, profile):
    @fuzz(profile, 250)
    @given(policy_files())
    def case(data):
        check_policy_file(run_cli, data)

    case()
    report("policy YAML", 1)


# ================================================================================ --set values
def _keys() -> list[str]:
    from attrctl.policy import load_policy
    from attrctl.policy.show import resolved_dict

    doc = resolved_dict(load_policy("toxicity"))
    return [".".join(map(str, p)) for p in _paths(doc) if p]


KEYS = _keys()
YAML_VALUES = ["[1", "{a: 1, a: 2}", "[" * 300 + "]" * 300, "!!python/object/apply:os.system [ls]",
               "&a [*a]", ".nan", ".inf", "-1", "1e999", "9" * 5000, "\x00", "null", "~", "",
               "'unterminated", "\t", "a: b: c", "- a\n- b", "{}", "[]", "cuda", "auto", "0"]  # fmt: skip


@st.composite
def overrides(draw) -> str:
    key = draw(
        st.one_of(
            st.sampled_from(KEYS),
            st.text(max_size=30),
            st.builds(
                lambda k, t: k + t,
                st.sampled_from(KEYS),
                st.sampled_from([".", "..", ".0", ".99", ".²", "." + "9" * 5000, ".-1", " ", ".x"]),
            ),
        )
    )
    sep = draw(st.sampled_from(["=", "=", "=", "", "==", " = "]))
    value = draw(st.one_of(st.sampled_from(YAML_VALUES), st.text(max_size=40),
                           st.builds(str, st.integers()), st.builds(repr, st.floats())))  # fmt: skip
    return key + sep + value


@pytest.mark.parametrize("profile", PROFILES)
def test_fuzz_set_overrides(run_cli, profile):
    @fuzz(profile, 200)
    @given(st.lists(overrides(), min_size=1, max_size=3))
    def case(sets):
        count("--set")
        args = [a for s in sets for a in ("--set", s)]
        with time_limit(60):
            code, out, err = run_cli("policy", "show", "toxicity", *args)
        assert_clean(code, out, err, "toxicity.yaml")

    case()
    report("--set", 1)


# ================================================================================== data files
JSON_LINES = st.one_of(
    st.builds(lambda v: json.dumps({"text": v}), SCALARS),
    st.builds(lambda d: json.dumps(d), st.dictionaries(st.text(max_size=8), SCALARS, max_size=3)),
    st.builds(lambda v: json.dumps(v), VALUES),
    st.text(max_size=40),
    st.sampled_from(["[" * 100_000 + "]" * 100_000, '{"text": ' + "9" * 5000 + "}", "",
                     '{"text": NaN}', '{"text": "a"} trailing', "\ufeff{}", '{"text": "\\ud800"}']),
)  # fmt: skip


@st.composite
def data_files(draw) -> tuple[str, bytes]:
    fmt = draw(st.sampled_from(["jsonl", "csv", "txt", "parquet"]))
    if fmt == "jsonl":
        lines = [
            line.encode("utf-8", "surrogatepass") for line in draw(st.lists(JSON_LINES, max_size=6))
        ]
        data = draw(st.sampled_from([b"\n", b"\r\n"])).join(lines)
    elif fmt == "csv":
        header = draw(st.sampled_from(["text", "text,label", "label", "", '"text"', "text,text"]))
        rows = draw(st.lists(st.text(max_size=30), max_size=5))
        data = "\n".join([header, *rows]).encode("utf-8", "surrogatepass")
        if draw(st.booleans()):
            data += b"\n\x00" if draw(st.booleans()) else b'\n"' + b"z" * 140_000
    elif fmt == "txt":
        data = draw(st.text(max_size=200)).encode("utf-8", "surrogatepass")
    else:
        data = _parquet(draw)
    if draw(st.integers(0, 3)) == 0 and data:  # damage it
        pos = draw(st.integers(0, len(data) - 1))
        data = draw(st.sampled_from([data[:pos], data[:pos] + b"\xff" + data[pos:],
                                     data[:pos] + bytes([data[pos] ^ 0x5A]) + data[pos + 1 :]]))  # fmt: skip
    return fmt, data


def _parquet(draw) -> bytes:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    kind = draw(st.sampled_from(["string", "int", "binary", "struct", "list", "other_name"]))
    n = draw(st.integers(0, 4))
    values = {
        "string": pa.array([draw(st.one_of(st.none(), st.text(max_size=20))) for _ in range(n)],
                           pa.string()),
        "int": pa.array(list(range(n)), pa.int64()),
        "binary": pa.array([b"\xff\x00"] * n, pa.binary()),
        "struct": pa.array([{"a": 1}] * n),
        "list": pa.array([["a"]] * n),
        "other_name": pa.array(["x"] * n),
    }[kind]  # fmt: skip
    buf = io.BytesIO()
    pq.write_table(pa.table({"other" if kind == "other_name" else "text": values}), buf)
    return buf.getvalue()


def _policy(tmp: Path, **extra):
    from attrctl.policy.schema import Policy

    raw = {
        "name": "fuzz",
        "model": "tiny-random",
        "data": [{"kind": "bundled", "name": "shakespeare", "domain": "general"}],
        "attributes": [{"name": "tox", "oracle": {"kind": "regex", "patterns": ["[aeiou]"]}}],
        "output_dir": str(tmp / "run"),
        **extra,
    }
    return Policy.model_validate(raw, context={"base_dir": tmp})


@pytest.mark.parametrize("profile", PROFILES)
def test_fuzz_data_files(profile):
    from attrctl.data.sources import load_source
    from attrctl.policy.schema import FileSource

    @fuzz(profile, 150)
    @given(data_files(), st.sampled_from(["auto", "explicit"]))
    def case(file, how):
        count("data files")
        fmt, data = file
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            path = tmp / f"data.{fmt}"
            path.write_bytes(data)
            policy = _policy(tmp)
            src = FileSource.model_validate(
                {"path": str(path), "domain": "d", "format": fmt if how == "explicit" else "auto"},
                context={"base_dir": tmp},
            )
            before = snapshot(tmp)
            try:
                with time_limit(60):
                    examples = load_source(src, policy)
            except AttrctlError as err:
                msg = str(err)
                assert str(path) in msg, msg
                if fmt == "jsonl" and "empty dataset" not in msg:  # a line-oriented format
                    assert re.search(r":\d+:|line \d+", msg), msg
            else:
                assert examples and all(
                    isinstance(e.text, str) and e.text.strip() for e in examples
                )
            assert snapshot(tmp) == before

    case()
    report("data files", 1)


# ================================================================================ prompt files
@pytest.mark.parametrize("profile", PROFILES)
def test_fuzz_prompt_files(profile):
    from attrctl.data.prompt_sets import load_prompt_set

    @fuzz(profile, 60)
    @given(st.one_of(st.binary(max_size=300),
                     st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass")),
                     st.lists(st.sampled_from(["# c", "", "  ", "You are a", "\x00", "\u2028"]))
                     .map(lambda ls: "\n".join(ls).encode())))  # fmt: skip
    def case(data):
        count("prompt files")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "prompts.txt"
            path.write_bytes(data)
            try:
                pset = load_prompt_set(str(path))
            except AttrctlError as err:
                assert str(path) in str(err)
            else:
                assert pset.prompts and all(p.strip() for p in pset.prompts)
            assert path.read_bytes() == data

    case()
    report("prompt files", 1)


# ================================================================================= synth files
class _NoModel:
    """Stands in for a loaded model: with stop_after=0 synthesize never samples."""

    spec = "tiny-random"


def _synth_policy(tmp: Path):
    src = {"kind": "synth", "domain": "toxic", "samples_per_prompt": 2, "max_new_tokens": 6,
           "batch_size": 3}  # fmt: skip
    return _policy(tmp, data=[src])


def _synth_rows(policy, continuations: list[str]) -> list[dict]:
    from attrctl.data.prompt_sets import load_prompt_set
    from attrctl.data.synth import row_settings, synth_source_of
    from attrctl.data.synth_file import settings_stamp

    source = synth_source_of(policy)
    stamp = settings_stamp(row_settings(policy, source, "tiny-random"))
    rows = []
    for ref in source.prompts:
        pset = load_prompt_set(ref)
        for p in range(2):
            for s in range(2):
                text = continuations[len(rows) % len(continuations)]
                rows.append({"prompt_set": pset.name, "prompt_index": p, "sample": s,
                             "prompt": pset.prompts[p], "continuation": text, "score": 0.5,
                             "scores": {"tox": 0.5}, "new_tokens": 3, **stamp})  # fmt: skip
    return rows


def _dump(rows) -> bytes:
    return b"".join((json.dumps(r, ensure_ascii=False) + "\n").encode() for r in rows)


@st.composite
def synth_files(draw) -> tuple[list[dict], bytes]:
    """Valid rows (as data synth writes them), then row-level and byte-level damage."""
    conts = draw(st.lists(st.text(max_size=20), min_size=1, max_size=3))
    rows = _synth_rows(_synth_policy(Path("/nonexistent")), conts)
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["drop_key", "retype", "settings", "prompt", "index", "dup",
                                   "drop_row", "swap"]))  # fmt: skip
        i = draw(st.integers(0, len(rows) - 1)) if rows else 0
        if not rows:
            break
        row = rows[i]
        if op == "drop_key":
            row.pop(draw(st.sampled_from(sorted(row))))
        elif op == "retype":
            row[draw(st.sampled_from(sorted(row)))] = draw(VALUES)
        elif op == "settings":
            key = draw(
                st.sampled_from(["seed", "model", "gen", "domain", "fingerprint", "labelled_by"])
            )
            row[key] = draw(VALUES)
        elif op == "prompt":
            row["prompt"] = draw(st.text(max_size=10))
        elif op == "index":
            row[draw(st.sampled_from(["prompt_index", "sample"]))] = draw(
                st.sampled_from([-1, 10**6, 2**70, 1.5, True, "0"])
            )
        elif op == "dup":
            rows.insert(i, copy.deepcopy(row))
        elif op == "drop_row":
            rows.pop(i)
        else:
            j = draw(st.integers(0, len(rows) - 1))
            rows[i], rows[j] = rows[j], rows[i]
    data = b"".join(
        (json.dumps(r, ensure_ascii=False, allow_nan=True) + "\n").encode("utf-8", "surrogatepass")
        for r in rows
    )
    for _ in range(draw(st.integers(0, 2))):
        op = draw(st.sampled_from(["truncate", "garbage", "not_utf8", "deep", "bigint", "blank",
                                   "crlf", "bom"]))  # fmt: skip
        pos = draw(st.integers(0, len(data)))
        line_start = data.rfind(b"\n", 0, pos) + 1
        insert = {"garbage": b"{oops\n", "not_utf8": b"\xff\xfe\n", "blank": b"\n  \n",
                  "deep": b"[" * 50_000 + b"]" * 50_000 + b"\n",
                  "bigint": b'{"a": ' + b"7" * 5000 + b"}\n", "bom": b"\xef\xbb\xbf"}  # fmt: skip
        if op == "truncate":
            data = data[:pos]
        elif op == "crlf":
            data = data.replace(b"\n", b"\r\n")
        else:
            data = data[:line_start] + insert[op] + data[line_start:]
    return rows, data


@pytest.mark.parametrize("profile", PROFILES)
def test_fuzz_synth_files(profile):
    from attrctl.data.sources import load_source
    from attrctl.data.synth import synthesize

    @fuzz(profile, 120)
    @given(synth_files())
    def case(file):
        count("synth files")
        _, data = file
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            out = tmp / "s.jsonl"
            out.write_bytes(data)
            policy = _synth_policy(tmp)
            policy = policy.model_copy(
                update={"data": [policy.data[0].model_copy(update={"path": str(out)})]}
            )
            for action in ("synth", "train"):  # `data synth` resuming it; training reading it
                try:
                    with time_limit(60):
                        if action == "synth":
                            synthesize(policy, out, model=_NoModel(), limit=2, stop_after=0,
                                       progress=False)  # fmt: skip
                        else:
                            load_source(policy.data[0], policy)
                except AttrctlError as err:
                    msg = str(err)
                    assert msg.startswith(str(out)), msg
                    if "corrupt row" in msg or "repeats line" in msg:
                        assert re.match(rf"{re.escape(str(out))}:\d+: ", msg), msg
                assert out.read_bytes() == data, f"{action} changed the synth file"
                assert sorted(p.name for p in tmp.iterdir()) == ["s.jsonl"], "a lock file stayed"

    case()
    report("synth files", 1)


@pytest.mark.parametrize("profile", PROFILES)
def test_fuzz_synth_rows_round_trip(profile):
    """Any continuation text data synth can write, read_rows reads back as written."""
    from attrctl.data.synth import read_rows

    @fuzz(profile, 60)
    @given(st.lists(st.text(), min_size=1, max_size=4))
    def case(conts):
        count("synth round trip")
        rows = _synth_rows(_synth_policy(Path("/nonexistent")), conts)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "s.jsonl"
            path.write_bytes(_dump(rows))
            assert read_rows(path) == rows

    case()
    report("synth round trip", 1)


# ============================================================================== run directories
FP = "0123456789abcdef"


def _fake_run(root: Path) -> None:
    """A finished run's files, as far as the readers look: manifest, run.json, policy, final
    model folder, fitted heads, metrics."""
    import numpy as np
    from safetensors.numpy import save_file

    (root / "model" / "final").mkdir(parents=True)
    (root / "model" / "final" / "config.json").write_text("{}")
    (root / "heads" / "iter_1").mkdir(parents=True)
    save_file(
        {"0.weight": np.zeros((3, 2), np.float32)}, str(root / "heads/iter_1/heads.safetensors")
    )
    (root / "heads" / "iter_1" / "heads.json").write_text(json.dumps({"attributes": ["tox"]}))
    (root / "run.json").write_text(json.dumps({"policy_fingerprint": FP, "policy_name": "fuzz"}))
    jobs = {"sample/0": {"iteration": 0, "rows": 4}, "fit/1": {"iteration": 1, "fitted": True},
            "finetune/1": {"iteration": 1, "steps": 2, "heads": 1}}  # fmt: skip
    (root / "state.json").write_text(json.dumps({"version": 1, "jobs": jobs}))
    (root / "policy.yaml").write_text(yaml.safe_dump(DOCS[-1]))
    recs = [{"kind": "step", "job": "finetune/1", "step": s, "ce": 1.0} for s in (1, 2)]
    (root / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))


RUN_FILES = ["run.json", "state.json", "policy.yaml", "metrics.jsonl", "model/final/config.json",
             "heads/iter_1/heads.safetensors", "heads/iter_1/heads.json", "lock", "model/final",
             "heads/iter_1"]  # fmt: skip


@st.composite
def json_damage(draw, text: str) -> bytes:
    """A JSON document with a value dropped, retyped or replaced, or made unparseable."""
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        doc = None
    if isinstance(doc, (dict, list)) and draw(st.booleans()):
        doc = mutate_data(draw, doc)
        return json.dumps(doc, allow_nan=True).encode()
    return draw(st.sampled_from([b"", b"{", b"[]", b"null", b"\xff\xfe", b"[" * 100_000,
                                 b'{"version": 2, "jobs": {}}', b'{"jobs": {"fit/x": {"fitted": 1}}}',
                                 b'{"jobs": {"fit/1": "yes"}}', b"7" * 5000]))  # fmt: skip


def _remove(path: Path) -> None:
    import shutil

    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def damage_file(draw, path: Path) -> None:
    """Damage one file or folder of a run directory in place."""
    op = draw(st.sampled_from(["delete", "truncate", "garbage", "json", "dir", "dangling"]))
    if path.parent.is_symlink() or not path.parent.is_dir():
        return  # its folder is already damaged (deleted, or a symlink loop)
    if op == "delete":
        _remove(path)
    elif op in ("truncate", "json") and path.is_file() and not path.is_symlink():
        data = path.read_bytes()
        if op == "truncate":
            path.write_bytes(data[: draw(st.integers(0, len(data)))])
        else:
            path.write_bytes(draw(json_damage(data.decode("utf-8", "replace"))))
    elif op == "garbage":
        _remove(path)
        path.write_bytes(draw(st.binary(max_size=64)))
    elif op == "dir":
        _remove(path)
        path.mkdir(parents=True)
    elif op == "dangling":  # a symlink loop where the file should be
        loop = path.parent / (path.name + ".loop")
        _remove(path)
        _remove(loop)
        path.symlink_to(loop.name)
        loop.symlink_to(path.name)


@pytest.mark.parametrize("profile", PROFILES)
def test_fuzz_run_directories(profile):
    from attrctl.policy import load_policy
    from attrctl.train.rundir import RunDir, open_finished_run

    @fuzz(profile, 120)
    @given(st.data())
    def case(data):
        count("run directories")
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp) / "run"
            root.mkdir()
            _fake_run(root)
            for _ in range(data.draw(st.integers(1, 2))):
                damage_file(data.draw, root / data.draw(st.sampled_from(RUN_FILES)))
            before = snapshot(root)
            with time_limit(60):
                for action in ("claim", "state", "finished", "metrics", "policy"):
                    run = RunDir(root)
                    try:
                        if action == "claim":  # what `train --resume` does first
                            run.claim("x", resume=True)
                            run.release()
                        elif action == "state":
                            run.state()
                        elif action == "finished":  # what eval, export, generate, report do
                            open_finished_run(root)
                        elif action == "metrics":
                            run.read_metrics()
                        else:
                            load_policy(root / "policy.yaml")
                    except AttrctlError as err:
                        assert str(root) in str(err), (action, str(err))
                    run.release()
            # (a lock file left behind — by a killed process, or garbage — is taken over and
            # removed: that is the one change reading a run directory may make)
            after = snapshot(root)
            after.pop("lock", None), before.pop("lock", None)
            assert after == before, "reading a run directory changed it"

    case()
    report("run directories", 1)


# ================================================================================= checkpoints
def _model(out_features: int = 3):
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, out_features))


def _ctx(root: Path, steps: int = 10):
    from attrctl.train.rundir import RunDir

    finetune = SimpleNamespace(steps=steps, grad_accum=1)
    return SimpleNamespace(writer=True, run=RunDir(root), policy=SimpleNamespace(finetune=finetune))


def _trained(out_features: int = 3):
    import torch

    model = _model(out_features)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    return model, opt


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A checkpoint of the model under test, and one of another policy's (other shapes)."""
    from attrctl.train.finetune import _checkpoint

    root = tmp_path_factory.mktemp("ckpt")
    for name, features in (("mine", 3), ("other", 5)):
        model, opt = _trained(features)
        _checkpoint(_ctx(root / name), 1, model, opt, step=3)
    return (
        root / "mine" / "checkpoints" / "finetune_1",
        root / "other" / "checkpoints" / "finetune_1",
    )


CKPT_FILES = ["trainable.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"]


def damage_safetensors(draw, data: bytes) -> bytes:
    """Truncated, a flipped byte in the header, or a rewritten header (dtype, shape, offsets,
    names) with a correct length prefix so the reader gets past it."""
    op = draw(st.sampled_from(["truncate", "flip", "header"]))
    if not data:
        return draw(st.binary(max_size=16))
    if op == "truncate":
        return data[: draw(st.integers(0, len(data) - 1))]
    try:  # an earlier damage may have broken the header already: flip a byte then
        n = struct.unpack("<Q", data[:8])[0]
        header = json.loads(data[8 : 8 + n])
        assert isinstance(header, dict) and header
    except (struct.error, ValueError, AssertionError):
        op = "flip"
    if op == "flip":
        i = draw(st.integers(0, min(len(data) - 1, 300)))
        return data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1 :]
    name = draw(st.sampled_from(sorted(header)))
    field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "name", "drop"]))
    if name == "__metadata__" or field == "drop":
        header.pop(name)
    elif field == "name":
        header["renamed." + name] = header.pop(name)
    else:
        header[name][field] = draw(
            st.sampled_from([[0, 10**12], [5, 1], [-1], [2, 2], "F64", "I8", "BOOL", "NOPE", [], 7])
        )
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data[8 + n :]


@pytest.mark.parametrize("profile", PROFILES)
def test_fuzz_checkpoints(checkpoints, profile):
    import shutil

    import torch

    from attrctl.train.finetune import _restore

    mine, other = checkpoints

    @fuzz(profile, 120)
    @given(st.data())
    def case(data):
        count("checkpoints")
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            ckpt = root / "checkpoints" / "finetune_1"
            shutil.copytree(mine, ckpt)
            for _ in range(data.draw(st.integers(1, 2))):
                name = data.draw(st.sampled_from(CKPT_FILES))
                path = ckpt / name
                op = data.draw(st.sampled_from(["damage", "other_policy", "delete", "empty"]))
                if op == "other_policy":  # the file from another policy's checkpoint
                    shutil.copy(other / name, path)
                elif op == "delete":
                    path.unlink(missing_ok=True)
                elif op == "empty":
                    path.write_bytes(b"")
                elif not path.exists():
                    continue
                elif name == "state.json":
                    text = path.read_bytes().decode("utf-8", "replace")
                    path.write_bytes(data.draw(json_damage(text)))
                else:
                    path.write_bytes(damage_safetensors(data.draw, path.read_bytes()))
            before = snapshot(root)
            model, opt = _trained(3)
            rng = torch.get_rng_state()
            try:
                with time_limit(60):
                    step = _restore(_ctx(root), 1, model, opt)
            except AttrctlError as err:
                assert str(ckpt) in str(err), str(err)
                torch.set_rng_state(rng)
            else:
                assert isinstance(step, int) and 0 <= step < 10
            assert snapshot(root) == before

    case()
    report("checkpoints", 1)


# ================================================================== regressions (found or filed)
def _write(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "p.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


VALID = "name: case\ndata:\n  - {kind: bundled, name: shakespeare, domain: general}\n" \
        "attributes:\n  - name: tox\n    oracle: {kind: lexicon, words: [idiot]}\n"  # fmt: skip


@pytest.mark.parametrize("shape", ["flow", "block"])
def test_regression_deep_nesting_is_exit_2_not_a_recursion_error(run_cli, tmp_path, shape):
    # Filed: a policy nested deeply enough crashed `policy validate` with a RecursionError
    # traceback and exit 1.
    if shape == "flow":
        text = VALID + "seed: " + "[" * 100_000 + "]" * 100_000 + "\n"
    else:
        text = VALID + "seed:\n" + "".join("  " * (d + 1) + "a:\n" for d in range(300))
    path = _write(tmp_path, text)
    code, out, err = run_cli("policy", "validate", path)
    assert code == 2 and "Traceback" not in out + err
    assert str(path) in err and "nested more than 64 levels deep" in err and "line 7" in err


def test_regression_duplicate_key_names_the_key_and_both_lines(run_cli, tmp_path):
    # Filed: a policy with the same key written twice was accepted silently, the later value
    # winning.
    path = _write(tmp_path, VALID + "seed: 1\nfinetune:\n  steps: 5\nseed: 2\n")
    code, _, err = run_cli("policy", "validate", path)
    assert code == 2 and str(path) in err and "Traceback" not in err
    assert "line 10, column 1: duplicate key 'seed', first on line 7" in err
    path = _write(tmp_path, VALID + "finetune:\n  steps: 5\n  steps: 50\n")
    code, _, err = run_cli("policy", "validate", path)
    assert code == 2 and "line 9, column 3: duplicate key 'steps', first on line 8" in err
    nested = _write(tmp_path, VALID.replace("words: [idiot]}", "words: [idiot], words: [x]}"))
    code, _, err = run_cli("policy", "validate", nested)
    assert code == 2 and "duplicate key 'words', first on line 6" in err


def test_regression_duplicate_key_in_set_value(run_cli):
    code, _, err = run_cli("policy", "show", "toxicity", "--set", "finetune={steps: 1, steps: 2}")
    assert code == 2 and "duplicate key 'steps'" in err and "toxicity.yaml" in err


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # an alias bomb: 9^9 values from ten lines
        ("bomb:\n  - &a0 [x,x,x,x,x,x,x,x,x]\n" + "".join(
            f"  - &a{k} [{', '.join([f'*a{k - 1}'] * 9)}]\n" for k in range(1, 10)),
         "more than 200,000 values once its aliases are expanded"),
        ("cycle: &c [*c]\n", "an alias refers to the anchor it is inside of"),
        ("seed: !!python/object/apply:os.system ['echo pwned']\n", "could not determine a constructor"),
        ("seed: 1\x07\n", "character U+0007 is not allowed in YAML"),
        ("seed: .nan\n", "seed"),
        ("finetune: {learning_rate: .inf}\n", "finetune.learning_rate"),
        ("seed: 99999999999999999999999\n", "seed"),
        # found by the long profile: a constructor's ValueError escaped the YAML reader
        ("seed: !!int x\n", "line 7, column 7: cannot read this value as int"),
        ("seed: " + "7" * 5000 + "\n", "line 7, column 7: cannot read this value as int"),
        ("description: !!bool maybe\n", "line 7, column 14: cannot read this value as bool"),
    ],
    ids=["alias_bomb", "alias_cycle", "python_tag", "control_char", "nan", "inf", "huge_seed",
         "int_tag", "int_5000_digits", "bool_tag"],
)  # fmt: skip
def test_regression_policy_text(run_cli, tmp_path, text, expected):
    path = _write(tmp_path, VALID + text)
    code, out, err = run_cli("policy", "validate", path)
    assert code == 2 and expected in err and str(path) in err and "Traceback" not in out + err


def test_regression_oversized_and_not_utf8_policy(run_cli, tmp_path):
    path = _write(tmp_path, VALID + "# " + "x" * 2**20 + "\n")
    code, _, err = run_cli("policy", "validate", path)
    assert code == 2 and "larger than 1 MiB" in err
    path = _write(tmp_path, VALID.encode() + b"description: caf\xe9\n")
    code, _, err = run_cli("policy", "validate", path)
    assert code == 2 and "not UTF-8 text" in err and "line 7" in err


def _loaders() -> list:
    """The loaders strict_yaml can use here: pure Python always, libyaml where PyYAML has it."""
    from attrctl import strict_yaml

    found = [pytest.param(strict_yaml._PyLoader, id="py")]
    if hasattr(strict_yaml, "_CLoader"):
        found.append(pytest.param(strict_yaml._CLoader, id="libyaml"))
    return found


def _nodes_written(text: str) -> int:
    """Nodes and aliases written in a YAML text (what MAX_NODES bounds), counted on PyYAML's own
    node graph, independently of attrctl.strict_yaml: the root, and every child of each distinct
    node (an alias is a second reference to its anchor's node)."""
    root = yaml.compose(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    count, seen, todo = 1, set(), [root]
    while todo:
        node = todo.pop()
        if id(node) in seen or not isinstance(node, yaml.CollectionNode):
            continue
        seen.add(id(node))
        children = [n for pair in node.value for n in pair] if isinstance(
            node, yaml.MappingNode) else node.value  # fmt: skip
        count += len(children)
        todo.extend(children)
    return count


def _most_keys_in_1_mib() -> str:
    lines, size, i = [VALID], len(VALID), 0
    while size < 2**20 - 64:
        line = f"k{i}: {i}\n"
        lines.append(line)
        size, i = size + len(line), i + 1
    return "".join(lines)


@pytest.mark.parametrize("loader", _loaders())
def test_regression_worst_case_parse_is_bounded_by_work(run_cli, tmp_path, monkeypatch, loader):
    """Just under 1 MiB of distinct keys — the slowest shape of an allowed file — ends with one
    clear message (problems listed up to 50, then counted). Parsing is bounded by MAX_NODES, a
    count of nodes rather than seconds, and this file stays under it with either loader, so
    whether it gets that message does not depend on the machine's speed or load."""
    from attrctl import strict_yaml

    monkeypatch.setattr(strict_yaml, "_LOADER", loader)
    text = _most_keys_in_1_mib()
    assert 150_000 < _nodes_written(text) < strict_yaml.MAX_NODES
    path = _write(tmp_path, text)
    code, _, err = run_cli("policy", "validate", path)
    assert code == 2 and "unknown key 'k0'" in err and "more problems" in err
    assert len(err.splitlines()) < 60 and "nodes" not in err


@pytest.mark.parametrize("loader", _loaders())
def test_more_nodes_than_max_nodes_is_refused(run_cli, tmp_path, monkeypatch, loader):
    """A text with more than MAX_NODES nodes (aliases counted, not expanded) is refused with kind
    "limit", naming the limit and the place of the first node past it; one at the bound is read.
    Both loaders count the same nodes (libyaml's in the graph check)."""
    from attrctl import strict_yaml
    from attrctl.strict_yaml import YAMLProblem, load_yaml

    monkeypatch.setattr(strict_yaml, "_LOADER", loader)
    monkeypatch.setattr(strict_yaml, "MAX_NODES", 50)

    def items(n: int) -> str:  # a mapping, its key, a list and n items: n + 3 nodes
        return "a:\n" + "".join(f"  - x{i}\n" for i in range(n))

    assert _nodes_written(items(47)) == 50
    assert load_yaml(items(47))[0] == {"a": [f"x{i}" for i in range(47)]}
    with pytest.raises(YAMLProblem) as err:
        load_yaml(items(48))  # the 51st node is item 47, on line 49
    assert err.value.kind == "limit" and (err.value.line, err.value.column) == (49, 5)
    assert str(err.value).startswith("line 49, column 5: more than 50 nodes")

    def aliases(k: int) -> str:  # 6 nodes and k aliases; 2k + 6 values once expanded
        return "a: &x [1]\nb: [" + ", ".join(["*x"] * k) + "]\n"

    assert _nodes_written(aliases(44)) == 50
    assert load_yaml(aliases(44))[0] == {"a": [1], "b": [[1]] * 44}
    with pytest.raises(YAMLProblem, match="more than 50 nodes") as err:
        load_yaml(aliases(45))
    assert err.value.kind == "limit"

    path = _write(tmp_path, VALID + "seed: [" + ", ".join(["1"] * 40) + "]\n")
    code, out, err_text = run_cli("policy", "validate", path)
    assert code == 2 and "Traceback" not in out + err_text
    assert f"{path}" in err_text and "more than 50 nodes" in err_text and "line 7" in err_text


@pytest.mark.parametrize(
    "override",
    ["attributes.²=1", "attributes." + "9" * 5000 + "=1", "seed=" + "[" * 300 + "]" * 300,
     "model=~nobody_attrctl/x", "model=./" + "a" * 5000, "data.0.prompts=[" + "b" * 5000 + "]",
     "seed=" + "9" * 5000],
    ids=["unicode_digit", "huge_index", "deep_value", "unknown_user", "long_path", "long_prompt",
         "int_5000_digits"],
)  # fmt: skip
def test_regression_set_values(run_cli, override):
    code, out, err = run_cli("policy", "show", "toxicity", "--set", override)
    assert_clean(code, out, err, "toxicity.yaml")
    assert code == 2


@pytest.mark.parametrize(
    ("fmt", "data", "expected"),
    [
        ("jsonl", b"[" * 100_000 + b"]" * 100_000 + b"\n", ":1: not usable JSON (RecursionError"),
        ("jsonl", b'{"text": ' + b"9" * 5000 + b"}\n", ":1: not usable JSON (ValueError"),
        ("jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', ":2: not UTF-8 text"),
        ("csv", b'text\n"' + b"z" * 140_000 + b"\n", "not valid CSV"),
        ("parquet", b"PAR1" + b"\x00" * 20 + b"PAR1", "not a readable parquet file"),
    ],
    ids=["jsonl_deep", "jsonl_bigint", "jsonl_not_utf8", "csv_overlong", "parquet"],
)  # fmt: skip
def test_regression_data_files(tmp_path, fmt, data, expected):
    from attrctl.data.sources import load_source
    from attrctl.policy.schema import FileSource

    path = tmp_path / f"d.{fmt}"
    path.write_bytes(data)
    src = FileSource.model_validate(
        {"path": str(path), "domain": "d"}, context={"base_dir": tmp_path}
    )
    with pytest.raises(AttrctlError) as err:
        load_source(src, _policy(tmp_path))
    assert str(path) in str(err.value) and expected in str(err.value)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b'{"prompt_set": ["toxic"], "prompt_index": 0, "sample": 0, "prompt": "a", '
         b'"continuation": "b", "scores": {}}', "`prompt_set` is a list, not text"),
        (b'{"a": ' + b"7" * 5000 + b"}", "corrupt row (ValueError)"),
        (b"[" * 50_000 + b"]" * 50_000, "corrupt row (RecursionError)"),
        (b"\xff\xfe", "not UTF-8"),
    ],
    ids=["unhashable_prompt_set", "bigint", "deep", "not_utf8"],
)  # fmt: skip
def test_regression_synth_rows(tmp_path, line, expected):
    from attrctl.data.synth import ROW_FIELDS, read_rows

    path = tmp_path / "s.jsonl"
    path.write_bytes(line + b"\n")
    with pytest.raises(AttrctlError, match=re.escape(f"{path}:1: ") + ".*" + re.escape(expected)):
        read_rows(path, required=ROW_FIELDS)


def test_regression_synth_row_with_line_separator_round_trips(tmp_path):
    # json.dumps(ensure_ascii=False) writes U+2028 and U+0085 raw; str.splitlines() split the row
    # there, so a continuation holding one made the whole synth file "corrupt".
    from attrctl.data.synth import read_rows

    rows = _synth_rows(_synth_policy(tmp_path), ["a\u2028b", "c\x85d", "e\u2029f\x1c"])
    path = tmp_path / "s.jsonl"
    path.write_bytes(_dump(rows))
    assert read_rows(path) == rows


def test_regression_duplicate_synth_row_is_refused(tmp_path):
    from attrctl.data.synth import synthesize

    policy = _synth_policy(tmp_path)
    rows = _synth_rows(policy, ["x"])
    out = tmp_path / "s.jsonl"
    out.write_bytes(_dump([*rows, rows[1]]))
    with pytest.raises(AttrctlError, match=re.escape(f"{out}:9: the row repeats line 2")):
        synthesize(policy, out, model=_NoModel(), limit=2, stop_after=0, progress=False)
