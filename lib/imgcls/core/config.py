"""Training strategies: the schema, validation with YAML paths, grid expansion and run keys.

A grid file has a ``defaults:`` mapping and a ``strategies:`` mapping of name -> deltas. Any
field given as a list becomes a grid axis: every combination is its own run (a "grid point").

A grid file is strict, so that it cannot mean something else than it says. It is read as YAML 1.2
(ruamel.yaml, safe mode; a ``%YAML 1.1`` directive is refused), where ``yes/no/on/off`` are text,
``010`` is 10 and ``1:30`` is text, and ``1e-4`` is a number. Then:

* a key that appears twice in one mapping (at any level) is refused, naming both lines;
* a name (a key) must be text: one that YAML reads as null, true/false, a number or a date
  (``~:``, ``true:``, ``1:``, ``2024-01-01:``) is refused with a "quote it" hint, so ``off:`` is
  the strategy 'off' and ``"1":`` the strategy '1';
* a field value that YAML reads as null or a date (``lr: ~``, ``weights:``, ``seed: 2024-01-01``)
  is refused with a hint; a strategy with no value (``baseline:``) still means "no deltas";
* a true/false field given text (``freeze_backbone: yes``) is refused with a hint.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.constructor import DuplicateKeyError, SafeConstructor
from ruamel.yaml.error import YAMLError
from ruamel.yaml.nodes import MappingNode, ScalarNode

BACKBONES = ("efficientnet_lite0", "resnet18")
OPTIMIZERS = ("adam", "adamw", "sgd")


class ConfigError(ValueError):
    """A grid file or strategy value is invalid; the message names the YAML path."""


@dataclass(frozen=True, repr=False)
class _Unquoted:
    """A plain YAML scalar kept as written because YAML reads it as something a grid cannot mean.

    The grid reader makes one of every null or date value and of every key that YAML reads as
    anything but text (null, true/false, a number, a date); validation refuses it with a hint.
    """

    text: str
    reads_as: str

    def __str__(self) -> str:
        return self.text

    __repr__ = __str__


def _is_null(value: Any) -> bool:
    return value is None or (isinstance(value, _Unquoted) and value.reads_as == "null")


def _describe(value: Any) -> tuple[str, str]:
    """Return (what YAML read, the text to quote) for a scalar that is not text."""
    if isinstance(value, _Unquoted):
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


def _name(key: Any, where: str) -> str:
    """Return a mapping key that names something (a strategy); refuse one that is not text."""
    if isinstance(key, str):
        return key
    reads_as, text = _describe(key)
    raise ConfigError(f'{where}.{text}: YAML reads this name as {reads_as}; quote it ("{text}")')


def _refuse_null_or_date(value: Any, where: str) -> None:
    """Refuse a field value that YAML read as null or as a date: no field takes either."""
    if _is_null(value):
        text = value.text if isinstance(value, _Unquoted) else "null"
        if text:
            raise ConfigError(
                f"{where}: YAML reads '{text}' as null (no value); remove it to keep the "
                f'default, or quote it ("{text}") if you mean the text'
            )
        raise ConfigError(
            f"{where}: YAML reads an empty value as null (no value); remove it to keep the "
            "default, or write a value"
        )
    is_date = isinstance(value, dt.date) or (
        isinstance(value, _Unquoted) and value.reads_as.startswith("a date")
    )
    if is_date:
        reads_as, text = _describe(value)
        raise ConfigError(f'{where}: YAML reads this value as {reads_as}; quote it ("{text}")')


@dataclass(frozen=True)
class Strategy:
    """One fully specified training strategy (one grid point)."""

    name: str = "default"
    backbone: str = "efficientnet_lite0"
    weights: str = "imagenet"
    freeze_backbone: bool = True
    image_size: int = 160
    folds: int = 5
    seed: int = 42
    epochs: int = 20
    patience: int = 5
    batch_size: int = 32
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    augment: bool = False
    dropout: float = 0.0
    min_accuracy: float = 0.70
    use_feature_cache: bool = True
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def params(self) -> dict[str, Any]:
        """Return every strategy field as a plain dict (what MLflow logs as params)."""
        data = dataclasses.asdict(self)
        data.pop("extra")
        return data

    @property
    def run_name(self) -> str:
        """Return a readable, file-system-safe run name, e.g. ``learning_rate-lr=0.001``."""
        suffix = ",".join(f"{k}={v}" for k, v in sorted(self.extra.get("grid_values", {}).items()))
        name = f"{self.name}-{suffix}" if suffix else self.name
        return "".join(c if c.isalnum() or c in "-_.=," else "_" for c in name)


FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "backbone": (str,),
    "weights": (str,),
    "freeze_backbone": (bool,),
    "image_size": (int,),
    "folds": (int,),
    "seed": (int,),
    "epochs": (int,),
    "patience": (int,),
    "batch_size": (int,),
    "optimizer": (str,),
    "lr": (float, int),
    "weight_decay": (float, int),
    "momentum": (float, int),
    "augment": (bool,),
    "dropout": (float, int),
    "min_accuracy": (float, int),
    "use_feature_cache": (bool,),
}
TUNABLE_FIELDS = tuple(k for k in FIELD_TYPES if k != "name")


def _check_value(key: str, value: Any, where: str) -> Any:
    """Validate one field value and return it converted (ints to floats where floats are meant)."""
    allowed = FIELD_TYPES[key]
    _refuse_null_or_date(value, where)
    if bool in allowed and isinstance(value, str):
        raise ConfigError(
            f"{where}: expected true or false, got the text {value!r}; write true or false"
        )
    if isinstance(value, bool) and bool not in allowed:
        raise ConfigError(f"{where}: expected {allowed[0].__name__}, got bool {value!r}")
    if not isinstance(value, allowed):
        raise ConfigError(
            f"{where}: expected {allowed[0].__name__}, got {type(value).__name__} {value!r}"
        )
    if float in allowed:
        value = float(value)
    if key == "backbone" and value not in BACKBONES:
        raise ConfigError(f"{where}: unknown backbone {value!r}; allowed: {', '.join(BACKBONES)}")
    if key == "optimizer" and value not in OPTIMIZERS:
        raise ConfigError(f"{where}: unknown optimizer {value!r}; allowed: {', '.join(OPTIMIZERS)}")
    if key == "lr" and not value > 0:
        raise ConfigError(f"{where}: learning rate must be > 0, got {value}")
    if key in ("weight_decay", "momentum", "dropout") and value < 0:
        raise ConfigError(f"{where}: must be >= 0, got {value}")
    if key == "dropout" and value >= 1:
        raise ConfigError(f"{where}: dropout must be < 1, got {value}")
    if key == "folds" and value < 2:
        raise ConfigError(f"{where}: k-fold cross-validation needs folds >= 2, got {value}")
    if key in ("epochs", "batch_size") and value < 1:
        raise ConfigError(f"{where}: must be >= 1, got {value}")
    if key == "image_size" and not 32 <= value <= 1024:
        raise ConfigError(f"{where}: image_size must be between 32 and 1024, got {value}")
    if key == "patience" and value < 0:
        raise ConfigError(
            f"{where}: patience must be >= 0 (0 disables early stopping), got {value}"
        )
    if key == "min_accuracy" and not 0 <= value <= 1:
        raise ConfigError(f"{where}: min_accuracy must be within [0, 1], got {value}")
    return value


def validate_fields(values: dict[str, Any], where: str) -> dict[str, Any]:
    """Check a mapping of strategy fields (values may be lists = grid axes); return it cleaned.

    Raises ConfigError, naming the YAML path under ``where``, for a non-mapping, an unknown key,
    an empty list, or a value of the wrong type or range (null, a date, or text for true/false
    included).
    """
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping of strategy fields, got {values!r}")
    cleaned: dict[str, Any] = {}
    for key, value in values.items():
        if key not in TUNABLE_FIELDS:
            raise ConfigError(
                f"{where}.{key}: unknown key; allowed keys: {', '.join(TUNABLE_FIELDS)}"
            )
        if isinstance(value, list):
            if not value:
                raise ConfigError(f"{where}.{key}: an empty list gives no grid points")
            cleaned[key] = [
                _check_value(key, v, f"{where}.{key}[{i}]") for i, v in enumerate(value)
            ]
        else:
            cleaned[key] = _check_value(key, value, f"{where}.{key}")
    return cleaned


def strategy_from_dict(values: dict[str, Any], where: str = "strategy") -> Strategy:
    """Build one validated :class:`Strategy` from plain values (no lists).

    Raises ConfigError as :func:`validate_fields` does, and for a list value.
    """
    values = dict(values)
    name = values.pop("name", "default")
    extra = values.pop("extra", {}) or {}
    cleaned = validate_fields(values, where)
    for key, value in cleaned.items():
        if isinstance(value, list):
            raise ConfigError(f"{where}.{key}: a single value is needed here, got a list")
    return Strategy(name=str(name), extra=dict(extra), **cleaned)


@dataclass(frozen=True)
class Grid:
    """An expanded, validated grid: its source file and its strategies in file order."""

    path: Path | None
    strategies: tuple[Strategy, ...]

    def names(self) -> list[str]:
        """Return the distinct strategy names in file order."""
        return list(dict.fromkeys(s.name for s in self.strategies))


def expand_grid(document: dict[str, Any], source: str = "<grid>") -> list[Strategy]:
    """Expand a parsed grid document (``defaults`` + ``strategies``) into grid points.

    ``defaults`` or a strategy's deltas may be null (empty): no fields. Raises ConfigError, naming
    ``source`` and the YAML path, for a top level that is not a mapping or has unknown keys, list
    values in ``defaults``, missing or empty ``strategies``, a strategy name that is not text
    (null, true/false, a number, a date: quote it), invalid fields (see :func:`validate_fields`),
    or grid points whose run names collide.
    """
    if not isinstance(document, dict):
        raise ConfigError(f"{source}: the top level must be a mapping with 'strategies'")
    unknown = set(document) - {"defaults", "strategies"}
    if unknown:
        raise ConfigError(
            f"{source}: unknown top-level key(s) {sorted(str(k) for k in unknown)}; "
            "allowed: defaults, strategies"
        )
    defaults = document.get("defaults")
    defaults = validate_fields({} if _is_null(defaults) else defaults, f"{source}:defaults")
    for key, value in defaults.items():
        if isinstance(value, list):
            raise ConfigError(f"{source}:defaults.{key}: defaults cannot be lists (grid axes)")
    strategies = document.get("strategies")
    if not isinstance(strategies, dict) or not strategies:
        raise ConfigError(f"{source}:strategies: expected a non-empty mapping of name -> fields")
    points: list[Strategy] = []
    for key, deltas in strategies.items():
        name = _name(key, f"{source}:strategies")
        where = f"{source}:strategies.{name}"
        deltas = validate_fields({} if _is_null(deltas) else deltas, where)
        merged = {**defaults, **deltas}
        axes = {k: v for k, v in merged.items() if isinstance(v, list)}
        fixed = {k: v for k, v in merged.items() if not isinstance(v, list)}
        for combo in itertools.product(*axes.values()) if axes else [()]:
            grid_values = dict(zip(axes.keys(), combo, strict=True))
            points.append(
                Strategy(name=str(name), extra={"grid_values": grid_values}, **fixed, **grid_values)
            )
    run_names = [p.run_name for p in points]
    duplicates = {n for n in run_names if run_names.count(n) > 1}
    if duplicates:
        raise ConfigError(f"{source}: grid points with identical names: {sorted(duplicates)}")
    return points


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
    """ruamel's safe constructor, kept strict for grid files.

    Duplicate keys are ruamel's own check (DuplicateKeyError), re-raised naming both lines. A null
    or date value, and a key that YAML reads as anything but text, becomes an :class:`_Unquoted`
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

    def construct_object(self, node: Any, deep: bool = False) -> Any:
        if node in self._key_nodes and isinstance(node, ScalarNode) and node.tag != _STR_TAG:
            return self.construct_unquoted(node)
        return super().construct_object(node, deep=deep)

    def construct_unquoted(self, node: Any) -> _Unquoted:
        reads_as = _READS_AS.get(node.tag)
        if node.tag == "tag:yaml.org,2002:timestamp":
            value = self.construct_yaml_timestamp(node)
            reads_as = "a date and time" if isinstance(value, dt.datetime) else "a date"
        return _Unquoted(node.value, reads_as or f"a {node.tag.rsplit(':', 1)[-1]}")

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


_GridConstructor.add_constructor("tag:yaml.org,2002:null", _GridConstructor.construct_unquoted)
_GridConstructor.add_constructor("tag:yaml.org,2002:timestamp", _GridConstructor.construct_unquoted)


def _read_grid_yaml(path: Path) -> Any:
    """Parse a grid file as strict YAML 1.2 (see the module docstring); raise ConfigError."""
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


def load_grid(path: str | Path, only: list[str] | None = None) -> Grid:
    """Read, validate and expand a grid YAML file; keep only the named strategies if given.

    The file is read strictly as YAML 1.2 (see the module docstring). Raises ConfigError, naming
    the file and the line or YAML path, for a missing file, invalid YAML, a ``%YAML`` directive
    other than 1.2, a duplicate key (both lines named), anything :func:`expand_grid` refuses, or
    ``only`` naming unknown strategies.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: grid file not found")
    document = _read_grid_yaml(path)
    points = expand_grid(document, source=str(path))
    if only:
        known = {p.name for p in points}
        missing = [n for n in only if n not in known]
        if missing:
            raise ConfigError(
                f"{path}: --only names unknown strategies {missing}; known: {sorted(known)}"
            )
        points = [p for p in points if p.name in only]
    return Grid(path=path, strategies=tuple(points))


def check_against_data(strategy: Strategy, class_counts: dict[str, int], where: str) -> None:
    """Refuse a strategy whose fold count exceeds the smallest class of the training data.

    Raises ConfigError naming ``where``.folds and the smallest class.
    """
    smallest = min(class_counts.values())
    if strategy.folds > smallest:
        cls = min(class_counts, key=class_counts.get)
        raise ConfigError(
            f"{where}.folds: {strategy.folds} folds but class {cls!r} has only {smallest} "
            "training images; stratified k-fold needs folds <= the smallest class size"
        )


def stable_hash(payload: Any, length: int = 12) -> str:
    """Return a short sha256 hex digest of a JSON-serialisable payload (sorted keys)."""
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def run_key(strategy: Strategy, data_md5: str, code_version: str) -> str:
    """Return the resume key of a grid point: hash of (params, data version, code version)."""
    return stable_hash({"params": strategy.params(), "data": data_md5, "code": code_version}, 16)
