"""Training strategies: the schema, validation with YAML paths, grid expansion and run keys.

A grid file has a ``defaults:`` mapping and a ``strategies:`` mapping of name -> deltas. Any
field given as a list becomes a grid axis: every combination is its own run (a "grid point").
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

BACKBONES = ("efficientnet_lite0", "resnet18")
OPTIMIZERS = ("adam", "adamw", "sgd")


class ConfigError(ValueError):
    """A grid file or strategy value is invalid; the message names the YAML path."""


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
    """Check a mapping of strategy fields (values may be lists = grid axes); return it cleaned."""
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
    """Build one validated :class:`Strategy` from plain values (no lists); raise ConfigError."""
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
    """Expand a parsed grid document (``defaults`` + ``strategies``) into grid points."""
    if not isinstance(document, dict):
        raise ConfigError(f"{source}: the top level must be a mapping with 'strategies'")
    unknown = set(document) - {"defaults", "strategies"}
    if unknown:
        raise ConfigError(
            f"{source}: unknown top-level key(s) {sorted(unknown)}; allowed: defaults, strategies"
        )
    defaults = validate_fields(document.get("defaults") or {}, f"{source}:defaults")
    for key, value in defaults.items():
        if isinstance(value, list):
            raise ConfigError(f"{source}:defaults.{key}: defaults cannot be lists (grid axes)")
    strategies = document.get("strategies")
    if not isinstance(strategies, dict) or not strategies:
        raise ConfigError(f"{source}:strategies: expected a non-empty mapping of name -> fields")
    points: list[Strategy] = []
    for name, deltas in strategies.items():
        where = f"{source}:strategies.{name}"
        deltas = validate_fields(deltas or {}, where)
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


def load_grid(path: str | Path, only: list[str] | None = None) -> Grid:
    """Read, validate and expand a grid YAML file; keep only the named strategies if given."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: grid file not found")
    try:
        document = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
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
    """Refuse a strategy whose fold count exceeds the smallest class of the training data."""
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
