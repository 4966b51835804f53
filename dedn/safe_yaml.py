"""The one way the project reads YAML a user gives it (training configs, search specs, the base config a
spec names, ``--set`` values): bounded, and every problem a DednInputError naming the file.

Limits, all checked before anything large is built:

* a file over ``MAX_BYTES`` (1 MiB) is refused before it is read;
* bytes that are not UTF-8 are refused (field ``encoding``);
* while the document is composed, every node's size *with its aliases expanded* is counted (each anchored
  node once, so the count costs time linear in the text): a document that expands to more than
  ``MAX_NODES`` nodes -- a "billion laughs" alias bomb, or merge keys that multiply -- is refused in
  milliseconds, without the expanded structure ever being built; so is nesting deeper than
  ``MAX_DEPTH`` and an alias that refers to the node that contains it;
* syntax errors, and values PyYAML cannot build (a 10,000-digit integer, a date like 2020-13-45), are
  one line: field ``yaml``, the problem, its line and column.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, SequenceNode
from yaml.resolver import Resolver

from dedn.errors import DednInputError

__all__ = ["MAX_BYTES", "MAX_DEPTH", "MAX_NODES", "load_mapping", "load_yaml", "parse_yaml"]

MAX_BYTES = 1 << 20  # the largest YAML file read
MAX_NODES = 100_000  # scalars, sequences and mappings in a document once its aliases are expanded
MAX_DEPTH = 64  # sequences and mappings nested in one another


class _Refused(Exception):
    """A problem with the YAML text; the caller names the source and field."""


def _where(mark: Any) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "unknown position"


try:  # libyaml's scanner and parser (several times faster), under PyYAML's Python composer and constructor
    from yaml._yaml import CParser

    class _Base(Composer, CParser, SafeConstructor, Resolver):
        def __init__(self, stream: str) -> None:
            CParser.__init__(self, stream)
            Composer.__init__(self)
            SafeConstructor.__init__(self)
            Resolver.__init__(self)

except ImportError:  # pragma: no cover - PyYAML built without libyaml
    _Base = yaml.SafeLoader  # type: ignore[misc,assignment]


class _BoundedLoader(_Base):
    """A safe loader that counts, while composing, how large each node is with its aliases expanded (the
    composer is PyYAML's Python one in either case, so the count sees every node and alias)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._expanded: dict[int, int] = {}  # id(node) -> size with aliases expanded, once composed
        self._depth = 0
        self._composed = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        event = self.peek_event()
        mark = event.start_mark if event is not None else None
        self._composed += 1
        if self._composed > MAX_NODES:
            raise _Refused(f"more than {MAX_NODES} nodes (at {_where(mark)})")
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise _Refused(f"nested deeper than {MAX_DEPTH} levels (at {_where(mark)})")
        alias = self.check_event(yaml.AliasEvent)
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        size = self._expanded.get(id(node))
        if size is None and alias:  # a node still being composed: an alias inside the node it names
            raise _Refused(f"an alias refers to a node that contains it (at {_where(mark)})")
        if size is None:
            if isinstance(node, SequenceNode):
                children: list[Node] = list(node.value)
            elif isinstance(node, MappingNode):
                children = [n for pair in node.value for n in pair]
            else:
                children = []
            size = 1
            for child in children:
                size += self._expanded[id(child)]
            self._expanded[id(node)] = size
        if size > MAX_NODES:
            raise _Refused(
                f"more than {MAX_NODES} nodes once aliases are expanded (at {_where(mark)}): refused as an alias bomb"
            )
        return node


def _describe(e: yaml.YAMLError) -> str:
    if isinstance(e, yaml.reader.ReaderError):
        return f"unacceptable character #x{ord(e.character) if isinstance(e.character, str) else e.character:04x} at position {e.position}"
    if isinstance(e, yaml.MarkedYAMLError):
        mark = e.problem_mark or e.context_mark
        text = e.problem or e.context or "problem"
        if e.context and e.problem:
            text += f" ({e.context}{' at ' + _where(e.context_mark) if e.context_mark is not None else ''})"
        return f"{text} at {_where(mark)}"
    return str(e)


def _parse(text: str) -> Any:
    loader = None
    try:
        loader = _BoundedLoader(text)  # the reader checks the characters here
        return loader.get_single_data()
    except yaml.YAMLError as e:
        raise _Refused(f"not valid YAML: {_describe(e)}") from None
    except (ValueError, OverflowError, TypeError, RecursionError) as e:  # values PyYAML cannot build
        raise _Refused(f"not valid YAML: cannot build a value: {e}") from None
    finally:
        if loader is not None:
            loader.dispose()


def parse_yaml(text: str, source: str, field: str) -> Any:
    """YAML text (a ``--set`` value) under the same limits as a file; a problem is a DednInputError
    naming ``source`` and ``field``."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_BYTES:
        raise DednInputError(source, field, f"value is over the limit of {MAX_BYTES} bytes")
    try:
        return _parse(text)
    except _Refused as e:
        raise DednInputError(source, field, f"value: {e}") from None


def load_yaml(path: str | os.PathLike[str], what: str) -> Any:
    """The YAML document in ``path`` (None for an empty file), read within the limits above; ``what``
    ("config", "search spec", ...) names the file in messages. Every problem is one DednInputError naming
    ``path``: not found (``file``), too large (``size``), not UTF-8 (``encoding``), not valid or too
    large once expanded (``yaml``)."""
    p = Path(path)
    if not p.exists():
        raise DednInputError(p, "file", f"{what} not found")
    if not p.is_file():
        raise DednInputError(p, "file", f"{what} is not a regular file")
    try:
        size = p.stat().st_size
        if size > MAX_BYTES:
            raise DednInputError(p, "size", f"{what} is {size} bytes, over the limit of {MAX_BYTES} bytes")
        with p.open("rb") as f:
            data = f.read(MAX_BYTES + 1)
    except OSError as e:
        raise DednInputError(p, "file", f"cannot read the {what}: {e.strerror or e}") from None
    if len(data) > MAX_BYTES:
        raise DednInputError(p, "size", f"{what} is over the limit of {MAX_BYTES} bytes")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DednInputError(
            p, "encoding", f"{what} is not UTF-8 text: byte 0x{data[e.start]:02x} at offset {e.start}"
        ) from None
    try:
        return _parse(text)
    except _Refused as e:
        raise DednInputError(p, "yaml", str(e)) from None


def load_mapping(path: str | os.PathLike[str], what: str) -> dict[str, Any]:
    """``load_yaml``, and the top level must be a mapping (an empty file is an empty one)."""
    raw = load_yaml(path, what)
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        kind = {list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}.get(
            type(raw), type(raw).__name__
        )
        raise DednInputError(path, "top level", f"a {what} must be a mapping of keys to values, got {kind}")
    return raw
