"""Reading a grid file strictly as YAML 1.2, keeping the line of every key and list item.

A grid file is strict, so that it cannot mean something else than it says. It is read as YAML 1.2
(ruamel.yaml, safe mode; a ``%YAML 1.1`` directive is refused), where ``yes/no/on/off`` are text,
``010`` is 10 and ``1:30`` is text, and ``1e-4`` is a number. Then:

* a key that appears twice in one mapping (at any level) is refused, naming both lines;
* a name (a key) must be text: one that YAML reads as null, true/false, a number or a date
  (``~:``, ``true:``, ``1:``, ``2024-01-01:``) is refused with a "quote it" hint, so ``off:`` is
  the strategy 'off' and ``"1":`` the strategy '1';
* a field value that YAML reads as null or a date (``lr: ~``, ``weights:``, ``seed: 2024-01-01``)
  is refused with a hint (:func:`yaml_hint`); a strategy with no value (``baseline:``) still means
  "no deltas".

Mappings come back as :class:`LineDict` and lists as :class:`LineList`, so that an error can name
``<file>:<line>: <YAML path>`` (:class:`Where`).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.constructor import DuplicateKeyError, SafeConstructor
from ruamel.yaml.error import YAMLError
from ruamel.yaml.nodes import MappingNode, ScalarNode


class ConfigError(ValueError):
    """A grid file or strategy value is invalid; the message names the file, line and YAML path."""


class LineDict(dict):
    """A YAML mapping with ``lines``: key -> 1-based line of the key in the file."""

    lines: dict[Any, int]


class LineList(list):
    """A YAML sequence with ``lines``: the 1-based line of each item in the file."""

    lines: list[int]


@dataclass(frozen=True)
class Where:
    """A place in a grid file: the file, the YAML path and the 1-based line (each may be unknown).

    ``str()`` gives ``grid.yaml:7: strategies.s.lr``, or ``grid.yaml: strategies.s.lr`` without a
    line, or ``strategy.lr`` without a file (a strategy given as a dict in Python).
    """

    file: str = ""
    path: str = ""
    line: int | None = None

    def __str__(self) -> str:
        head = f"{self.file}:{self.line}" if self.file and self.line else self.file
        return f"{head}: {self.path}" if head and self.path else head or self.path

    def key(self, key: Any, mapping: Any) -> Where:
        """Return the place of ``mapping[key]`` (its line when ``mapping`` is a :class:`LineDict`)."""
        line = getattr(mapping, "lines", {}).get(key, self.line)
        return Where(self.file, f"{self.path}.{key}" if self.path else str(key), line)

    def item(self, index: int, sequence: Any) -> Where:
        """Return the place of ``sequence[index]`` (its line when it is a :class:`LineList`)."""
        lines = getattr(sequence, "lines", [])
        line = lines[index] if index < len(lines) else self.line
        return Where(self.file, f"{self.path}[{index}]", line)


@dataclass(frozen=True, repr=False)
class Unquoted:
    """A plain YAML scalar kept as written because YAML reads it as something a grid cannot mean.

    The grid reader makes one of every null or date value and of every key that YAML reads as
    anything but text (null, true/false, a number, a date); validation refuses it with a hint.
    """

    text: str
    reads_as: str

    def __str__(self) -> str:
        return self.text

    __repr__ = __str__


def is_null(value: Any) -> bool:
    """Return True for a YAML null (``~``, ``null`` or nothing), as read by :func:`read_grid_yaml`."""
    return value is None or (isinstance(value, Unquoted) and value.reads_as == "null")


def _describe(value: Any) -> tuple[str, str]:
    """Return (what YAML read, the text to quote) for a scalar that is not text."""
    if isinstance(value, Unquoted):
        return value.reads_as, value.text
    if value is None:
        return "null", "null"
    if isinstance(value, bool):
        return "true/false", str(value).lower()
    if isinstance(value, int | float):
        return "a number", str(value)
    if isinstance(value, dt.datetime):
        return "a date and time", value.isoformat(sep=" ")
    if isinstance(value, dt.date):
        return "a date", value.isoformat()
    return f"a {type(value).__name__}", str(value)


def name_of(key: Any, mapping: Any, parent: Where) -> str:
    """Return ``key`` of ``mapping`` (at ``parent``) as a name (a strategy's).

    Raises ConfigError with a "quote it" hint, naming the key's line, for a key YAML reads as
    null, true/false, a number or a date.
    """
    if isinstance(key, str):
        return key
    reads_as, text = _describe(key)
    at = parent.key(key, mapping)
    at = Where(at.file, f"{parent.path}.{text}" if parent.path else text, at.line)
    raise ConfigError(f'{at}: YAML reads this name as {reads_as}; quote it ("{text}")')


def yaml_hint(value: Any) -> str | None:
    """Return what is wrong and how to fix it for a field value YAML read as null or a date.

    No strategy field takes either; None for any other value.
    """
    if is_null(value):
        text = value.text if isinstance(value, Unquoted) else "null"
        if text:
            return (
                f"YAML reads '{text}' as null (no value); remove it to keep the default, "
                f'or quote it ("{text}") if you mean the text'
            )
        return (
            "YAML reads an empty value as null (no value); remove it to keep the default, "
            "or write a value"
        )
    if isinstance(value, dt.date) or (
        isinstance(value, Unquoted) and value.reads_as.startswith("a date")
    ):
        reads_as, text = _describe(value)
        return f'YAML reads this value as {reads_as}; quote it ("{text}")'
    return None


_STR_TAG = "tag:yaml.org,2002:str"
_READS_AS = {
    "tag:yaml.org,2002:null": "null",
    "tag:yaml.org,2002:bool": "true/false",
    "tag:yaml.org,2002:int": "a number",
    "tag:yaml.org,2002:float": "a number",
}


class _Refused(Exception):
    """The grid reader refuses the file; ``line`` is 1-based (None: the whole file)."""

    def __init__(self, line: int | None, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


class _GridConstructor(SafeConstructor):
    """ruamel's safe constructor, kept strict for grid files and keeping lines.

    Duplicate keys are ruamel's own check (DuplicateKeyError), re-raised naming both lines. A null
    or date value, and a key that YAML reads as anything but text, becomes an :class:`Unquoted`
    holding the text as written, for validation to refuse with a hint naming its YAML path.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._key_nodes: set[Any] = set()

    def construct_document(self, node: Any) -> Any:
        version = tuple(self.resolver.processing_version)
        if version != (1, 2):
            raise _Refused(
                None,
                f"the file declares %YAML {version[0]}.{version[1]}; grid files are read as "
                "YAML 1.2 (yes/no/on/off are text, 010 is 10): remove the %YAML line",
            )
        return super().construct_document(node)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, MappingNode):
            self._key_nodes.update(key_node for key_node, _ in node.value)
        return super().construct_mapping(node, deep=deep)

    def construct_line_dict(self, node: Any) -> Iterator[LineDict]:
        data = LineDict()
        data.lines = {}
        yield data
        data.update(self.construct_mapping(node))
        for key_node, _ in node.value:
            try:
                data.lines.setdefault(self._key(key_node), key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key: ruamel has refused it already
                continue

    def construct_line_list(self, node: Any) -> Iterator[LineList]:
        data = LineList()
        data.lines = [child.start_mark.line + 1 for child in node.value]
        yield data
        data.extend(self.construct_sequence(node))

    def construct_object(self, node: Any, deep: bool = False) -> Any:
        if node in self._key_nodes and isinstance(node, ScalarNode) and node.tag != _STR_TAG:
            return self.construct_unquoted(node)
        return super().construct_object(node, deep=deep)

    def construct_unquoted(self, node: Any) -> Unquoted:
        reads_as = _READS_AS.get(node.tag)
        if node.tag == "tag:yaml.org,2002:timestamp":
            value = self.construct_yaml_timestamp(node)
            reads_as = "a date and time" if isinstance(value, dt.datetime) else "a date"
        return Unquoted(node.value, reads_as or f"a {node.tag.rsplit(':', 1)[-1]}")

    def check_mapping_key(
        self, node: Any, key_node: Any, mapping: Any, key: Any, value: Any
    ) -> bool:
        try:
            return super().check_mapping_key(node, key_node, mapping, key, value)
        except DuplicateKeyError as exc:
            text = key_node.value if isinstance(key_node, ScalarNode) else str(key)
            first = next(
                (k for k, _ in node.value if k is not key_node and self._key(k) == key), None
            )
            since = f" (first defined at line {first.start_mark.line + 1})" if first else ""
            raise _Refused(
                key_node.start_mark.line + 1,
                f"duplicate key '{text}'{since}; each key may appear once",
            ) from exc

    def _key(self, key_node: Any) -> Any:
        key = self.construct_object(key_node, deep=True)
        return tuple(key) if isinstance(key, list) else key


for _tag, _method in (
    ("null", _GridConstructor.construct_unquoted),
    ("timestamp", _GridConstructor.construct_unquoted),
    ("map", _GridConstructor.construct_line_dict),
    ("seq", _GridConstructor.construct_line_list),
):
    _GridConstructor.add_constructor(f"tag:yaml.org,2002:{_tag}", _method)


def read_grid_yaml(path: Path) -> Any:
    """Parse a grid file as strict YAML 1.2 (see the module docstring).

    Returns the document, its mappings as :class:`LineDict` and lists as :class:`LineList`.
    Raises ConfigError naming the file (and the line) for invalid YAML, a ``%YAML`` directive
    other than 1.2 or a duplicate key.
    """
    reader = YAML(typ="safe", pure=True)  # a fresh reader: a %YAML directive would stick
    reader.version = (1, 2)
    reader.allow_duplicate_keys = False
    reader.Constructor = _GridConstructor
    try:
        return reader.load(path.read_text())
    except _Refused as exc:
        at = f"{path}:{exc.line}" if exc.line else str(path)
        raise ConfigError(f"{at}: {exc.message}") from exc
    except YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
