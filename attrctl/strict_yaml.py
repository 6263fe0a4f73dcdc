"""Reading YAML strictly and within bounds: the YAML reader of policy files and ``--set`` values.

``yaml.safe_load`` runs no code, but on its own it

- accepts a mapping that names a key twice, the later value silently winning;
- recurses once per nesting level, so a deeply nested file ends in a ``RecursionError``;
- expands aliases without limit: ten lines of anchors can stand for a billion values, which every
  consumer of the document (validation, error messages, ``policy show``) would walk.

:func:`load_yaml` refuses each of these with a :class:`YAMLProblem` that says where: a duplicate
key names the key and both lines; nesting deeper than :data:`MAX_DEPTH`, more than
:data:`MAX_NODES` nodes written in the text, more than :data:`MAX_VALUES` values once aliases
are expanded, or an alias inside its own anchor are errors too, as is every parser error (with
its line and column), a control character, and running out of memory. Callers bound the size of
what they pass. Every limit counts work, never time: whether a text is accepted does not depend
on how fast or how loaded the machine is.

Parsing uses libyaml where PyYAML was built with it, else the pure-Python parser, with the depth
and the nodes counted while composing (a 1 MiB file of the worst allowed shape takes a few
seconds there, a fraction of that with libyaml).
"""

from __future__ import annotations

from typing import Any

import yaml

MAX_DEPTH = 64  # nesting levels; a policy needs 5
MAX_VALUES = 200_000  # scalars, lists and mappings after alias expansion; a policy has ~200
# Nodes written in the text: each scalar, list, mapping and alias counts once (an alias is not
# expanded here; MAX_VALUES bounds the expansion). A policy has ~200. Callers cap a policy file
# at 1 MiB; the most keys that fit in it (`k{i}: {i}` lines, the slowest shape of an allowed
# file) are 152,966 nodes, under this bound, so such a file still gets its list of unknown keys.
# Denser shapes (`[a,a,...]`: a node per 2 bytes) are refused here rather than composed in full.
# What is written never outnumbers what it expands to, so this bound refuses only texts that
# MAX_VALUES would refuse too, but while composing, before the work is done.
MAX_NODES = 200_000


class YAMLProblem(Exception):
    """Why a YAML text was refused. ``str()`` is one line starting with where the problem is
    (``line 3, column 5: ...``) when the parser knows it.

    Attributes:
        problem: what is wrong, without the place.
        line, column: 1-based place of the problem, or None.
        kind: ``"syntax"`` (the text is not valid YAML), ``"duplicate"`` (a key written twice)
            or ``"limit"`` (too deep, too many nodes, too many values, out of memory).
    """

    def __init__(self, problem: str, line: int | None = None, column: int | None = None,
                 kind: str = "syntax"):  # fmt: skip
        self.problem, self.line, self.column, self.kind = problem, line, column, kind
        where = f"line {line}, column {column}: " if line is not None and column is not None else ""
        if line is not None and column is None:
            where = f"line {line}: "
        super().__init__(where + problem)


class _Refused(yaml.MarkedYAMLError):
    """Raised inside the loader; turned into a :class:`YAMLProblem` by :func:`load_yaml`."""

    def __init__(self, problem: str, mark: Any = None, kind: str = "limit"):
        super().__init__(problem=problem, problem_mark=mark)
        self.kind = kind


class _StrictConstructor(yaml.constructor.SafeConstructor):
    """``SafeConstructor`` that refuses a key written twice in one mapping, and reports a value
    its tag cannot read (``!!int x``, an integer of 5,000 digits) as a YAML error at the value."""

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep=deep)
        except yaml.YAMLError:
            raise
        except (ValueError, TypeError, OverflowError, KeyError, IndexError, AttributeError) as err:
            # e.g. `!!int x`, `!!bool maybe`, an integer past Python's 4,300-digit limit
            tag = node.tag.rsplit(":", 1)[-1]
            problem = str(err).splitlines()[0][:120]
            raise _Refused(f"cannot read this value as {tag} ({problem})", node.start_mark,
                           kind="syntax") from None  # fmt: skip

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, yaml.Node] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *base` merges; explicit keys override merged ones by design
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:
                    continue  # an unhashable key: the base constructor reports it
                if first is not None:
                    raise _Refused(
                        f"duplicate key {key!r}, first on line {first.start_mark.line + 1}; a "
                        "key may appear once in a mapping (the later value would silently win)",
                        key_node.start_mark,
                        kind="duplicate",
                    )
                seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


class _PyLoader(
    yaml.reader.Reader,
    yaml.scanner.Scanner,
    yaml.parser.Parser,
    yaml.composer.Composer,
    _StrictConstructor,
    yaml.resolver.Resolver,
):
    """The pure-Python loader (where PyYAML was built without libyaml): its composer recurses
    once per level, so depth and nodes are counted while composing."""

    def __init__(self, stream: str):
        yaml.reader.Reader.__init__(self, stream)
        yaml.scanner.Scanner.__init__(self)
        yaml.parser.Parser.__init__(self)
        yaml.composer.Composer.__init__(self)
        _StrictConstructor.__init__(self)
        yaml.resolver.Resolver.__init__(self)
        self._depth = 0
        self._nodes = 0  # compose_node calls: nodes and aliases, in the order of the text

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _Refused(_TOO_DEEP, self.peek_event().start_mark)
            self._nodes += 1
            if self._nodes > MAX_NODES:
                raise _Refused(_too_many_nodes(), self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


_LOADER: Any = _PyLoader
if getattr(yaml, "__with_libyaml__", False):

    class _CLoader(yaml.cyaml.CParser, _StrictConstructor, yaml.resolver.Resolver):
        """libyaml's parser (~20× faster: 1 MiB in a fraction of a second; it stops at 1,000
        levels of nesting by itself, the stricter depth limit is checked on its node graph)."""

        def __init__(self, stream: str):
            yaml.cyaml.CParser.__init__(self, stream)
            _StrictConstructor.__init__(self)
            yaml.resolver.Resolver.__init__(self)

    _LOADER = _CLoader

_TOO_DEEP = f"nested more than {MAX_DEPTH} levels deep"


def _too_many_nodes() -> str:  # read at raise time: a test may lower MAX_NODES
    return (f"more than {MAX_NODES:,} nodes (scalars, lists, mappings and aliases); a policy "
            "has a few hundred")  # fmt: skip


def load_yaml(text: str) -> tuple[Any, yaml.Node | None]:
    """Parse one YAML document strictly: ``(data, node)``, the node graph for line lookups.

    Raises:
        YAMLProblem: the text is not valid YAML, names a key twice in one mapping, nests too
            deeply, has too many nodes, expands to too many values, refers to an anchor from
            inside it, or does not fit in memory.
    """
    try:
        loader = _LOADER(text)
        try:
            node = loader.get_single_node()
            if node is None:
                return None, None
            _check_graph(node)
            return loader.construct_document(node), node
        finally:
            loader.dispose()
    except _Refused as err:
        raise _problem(err, err.kind) from None
    except yaml.reader.ReaderError as err:
        raise _reader_problem(text, err) from None
    except yaml.YAMLError as err:
        if "exceeded maximum nesting depth" in str(getattr(err, "problem", "")):  # libyaml's own
            raise _problem(_Refused(_TOO_DEEP, err.problem_mark), "limit") from None
        raise _problem(err, "syntax") from None
    except RecursionError:
        raise YAMLProblem("nested too deeply to parse", kind="limit") from None
    except MemoryError:
        raise YAMLProblem("too large to parse in the memory available", kind="limit") from None


def _problem(err: yaml.YAMLError, kind: str) -> YAMLProblem:
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    context = getattr(err, "context", None)
    if context and kind == "syntax" and context not in problem:
        problem = f"{problem} ({context})"
    if mark is None:
        return YAMLProblem(problem, kind=kind)
    return YAMLProblem(problem, mark.line + 1, mark.column + 1, kind)


def _reader_problem(text: str, err: yaml.reader.ReaderError) -> YAMLProblem:
    """A character YAML does not allow (a control character, say): where, and which one. The
    pure-Python reader counts characters; libyaml counts bytes of the UTF-8 text."""
    char = err.character if isinstance(err.character, str) else chr(err.character or 0)
    if _LOADER is _PyLoader:
        before = text[: err.position]
    else:
        before = text.encode("utf-8")[: err.position].decode("utf-8", "replace")
    line = before.count("\n") + 1
    column = len(before) - (before.rfind("\n") + 1) + 1
    return YAMLProblem(
        f"character U+{ord(char):04X} is not allowed in YAML ({err.reason})", line, column
    )


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _check_graph(root: yaml.Node) -> None:
    """Refuse a node graph written with more than MAX_NODES nodes and aliases, that, once its
    aliases are expanded, nests deeper than MAX_DEPTH or stands for more than MAX_VALUES values,
    or that holds an alias inside its own anchor (a cycle). One pass, linear in the graph (shared
    nodes are measured once). The walk goes in the order of the text and counts each node and
    each alias once, as the pure-Python composer does, so libyaml's graph meets the same bound."""
    size: dict[int, int] = {}
    height: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    nodes = 0
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        children = _children(node)
        if children_done:
            on_path.discard(key)
            size[key] = 1 + sum(size[id(c)] for c in children)
            height[key] = 1 + max((height[id(c)] for c in children), default=0)
            if size[key] > MAX_VALUES:
                raise _Refused(
                    f"stands for more than {MAX_VALUES:,} values once its aliases are expanded",
                    node.start_mark,
                )
            continue
        nodes += 1  # a node, or an alias of one measured already (refused at its anchor's place)
        if nodes > MAX_NODES:
            raise _Refused(_too_many_nodes(), node.start_mark)
        if key in size:
            continue
        on_path.add(key)
        stack.append((node, True))
        for child in children:
            if id(child) in on_path:
                raise _Refused("an alias refers to the anchor it is inside of", child.start_mark)
        stack.extend((child, False) for child in reversed(children))  # the first on top
    if height[id(root)] > MAX_DEPTH:  # say where: walk down the deepest path
        node = root
        for _ in range(MAX_DEPTH):
            node = max(_children(node), key=lambda c: height[id(c)])
        raise _Refused(_TOO_DEEP, node.start_mark)
