"""Reading a YAML config file: limits against hostile files, and where each key stands.

:func:`load` returns the data with the line and column of every key path, so that every
problem found later (by the schema, by a rule) can be reported as ``FILE:LINE:COL``. The limits
keep a hostile or broken file from taking the memory, or the time of the core thread (a SIGHUP
reload is parsed there): a YAML alias "bomb" of a few lines would otherwise expand to billions
of values, deep nesting would end in a RecursionError.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

MAX_FILE_BYTES = 1024 * 1024
MAX_VALUES = 50_000  # YAML nodes (keys, values, list items), counted with aliases expanded
MAX_DEPTH = 64  # nesting of mappings and lists

Position = tuple[int, int]  # line, column (1-based)


class YamlError(Exception):
    """The text is not a usable YAML document; ``line``/``col`` say where."""

    def __init__(self, line: int, col: int, message: str) -> None:
        super().__init__(message)
        self.line, self.col, self.message = line, col, message


def join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def load(text: str) -> tuple[Any, dict[str, Position], list[tuple[str, str, Position]]]:
    """``(data, positions, problems)``: the document (None when empty), the position of every
    key path, and the duplicate keys. Raises :class:`YamlError`."""
    if len(text) > MAX_FILE_BYTES:
        raise YamlError(1, 1, f"(file): larger than {MAX_FILE_BYTES // 1024} KiB")
    loader = None
    try:
        loader = _Loader(text)  # reading starts here: a bad character is a YAMLError too
        node = loader.get_single_node()
        if node is None:
            return None, {}, []
        _check_expansion(node)
        data = loader.construct_document(node)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        raise YamlError(line, col, f"(yaml): {e.problem or e}") from None
    except yaml.YAMLError as e:
        raise YamlError(1, 1, f"(yaml): {e}") from None
    finally:
        if loader is not None:
            loader.dispose()
    positions: dict[str, Position] = {}
    problems: list[tuple[str, str, Position]] = []
    _positions(node, "", positions, problems)
    return data, positions, problems


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing documents past :data:`MAX_VALUES` or :data:`MAX_DEPTH`
    while it composes them (before any memory is spent on them)."""

    def __init__(self, stream) -> None:
        super().__init__(stream)
        self._nodes = 0
        self._depth = 0

    def compose_node(self, parent, index):
        self._nodes += 1
        self._depth += 1
        try:
            if self._nodes > MAX_VALUES or self._depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, _too_big(self._depth > MAX_DEPTH), self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _too_big(deep: bool) -> str:
    if deep:
        return f"nested more than {MAX_DEPTH} levels deep"
    return f"more than {MAX_VALUES} values (aliases counted each time they are used)"


def _check_expansion(root: yaml.Node) -> None:
    """Refuse a composed document whose aliases expand past the limits, or refer to a node
    that contains them (a cycle): every later walk over it (positions, the schema) visits each
    alias use again. Iterative, each node once."""
    size: dict[int, tuple[int, int]] = {}  # id(node) -> (values, depth) once expanded
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    visiting: set[int] = set()
    while stack:
        node, finished = stack.pop()
        key = id(node)
        kids = _children(node)
        if finished:
            values = 1 + sum(size[id(k)][0] for k in kids)
            depth = 1 + max((size[id(k)][1] for k in kids), default=0)
            if values > MAX_VALUES or depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(None, None, _too_big(depth > MAX_DEPTH),
                                                  node.start_mark)
            size[key] = (values, depth)
            visiting.discard(key)
        elif key in visiting:
            raise yaml.composer.ComposerError(None, None, "an alias refers to a node that "
                                              "contains it", node.start_mark)
        elif key not in size:
            visiting.add(key)
            stack.append((node, True))
            stack.extend((k, False) for k in kids)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _positions(node: yaml.Node, path: str, out: dict[str, Position],
               errors: list[tuple[str, str, Position]]) -> None:
    """Record the line/column (1-based) of every key path in the composed YAML tree."""
    out.setdefault(path, (node.start_mark.line + 1, node.start_mark.column + 1))
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = str(key_node.value)
            sub = join(path, key)
            pos = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            if key in seen:
                errors.append((sub, "duplicate key", pos))
            seen.add(key)
            out[sub] = pos
            _positions(value_node, sub, out, errors)
            out[sub] = pos
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _positions(item, f"{path}[{i}]", out, errors)


def position_of(path: str, positions: dict[str, Position]) -> Position:
    """The position of ``path`` or, for a missing key, of its nearest parent."""
    while path:
        if path in positions:
            return positions[path]
        path = re.sub(r"(\.[^.\[\]]+|\[\d+\])$", "", path)
        if path in positions:
            return positions[path]
        if "." not in path and "[" not in path:
            break
    return positions.get(path, positions.get("", (1, 1)))
