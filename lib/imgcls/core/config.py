"""Grid files: expansion into grid points, loading, and the run key of a grid point.

A grid file has a ``defaults:`` mapping and a ``strategies:`` mapping of name -> deltas. Any
field given as a list becomes a grid axis: every combination is its own run (a "grid point").
``defaults:`` changes the schema's defaults (:class:`~imgcls.core.strategy.Strategy`) for every
strategy of the file; a strategy's deltas change them for its own grid points. An optional
``promotion:`` mapping (:class:`~imgcls.core.strategy.PromotionSettings`: rope, alpha, metric)
says when the grid's best point replaces the previous champion; it changes no grid point.

The file is read strictly (:mod:`imgcls.core.gridfile`: YAML 1.2, no duplicate keys, no silent
null/date/yes-no surprises) and every value is checked against the schema
(:mod:`imgcls.core.strategy`); each error names ``<file>:<line>: <YAML path>`` and how to fix it.
This module re-exports the names the rest of the package imports from here.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imgcls.core.gridfile import ConfigError, Where, is_null, name_of, read_grid_yaml
from imgcls.core.strategy import (
    BACKBONES,
    OPTIMIZERS,
    PROMOTION_FIELDS,
    TUNABLE_FIELDS,
    PromotionSettings,
    Strategy,
    check_ensemble,
    check_fields,
    check_promotion,
    strategy_from_dict,
)

__all__ = [
    "BACKBONES",
    "OPTIMIZERS",
    "PROMOTION_FIELDS",
    "TUNABLE_FIELDS",
    "ConfigError",
    "Grid",
    "PromotionSettings",
    "Strategy",
    "check_against_data",
    "expand_grid",
    "grid_defaults",
    "grid_promotion",
    "load_grid",
    "run_key",
    "stable_hash",
    "strategy_from_dict",
]


@dataclass(frozen=True)
class Grid:
    """An expanded, validated grid: its source file, its strategies in file order, and its
    ``promotion:`` settings (the defaults when the file has no such section)."""

    path: Path | None
    strategies: tuple[Strategy, ...]
    promotion: PromotionSettings = field(default_factory=PromotionSettings)

    def names(self) -> list[str]:
        """Return the distinct strategy names in file order."""
        return list(dict.fromkeys(s.name for s in self.strategies))


def grid_defaults(document: dict[str, Any], source: str = "<grid>") -> dict[str, Any]:
    """Return the checked ``defaults:`` of a parsed grid document (``{}`` when absent or empty).

    Raises ConfigError, naming ``source``, the line and YAML path, for an invalid field (see
    :func:`~imgcls.core.strategy.check_fields`) or a list (defaults cannot be grid axes).
    """
    top = Where(source)
    defaults = document.get("defaults")
    where = top.key("defaults", document)
    defaults = check_fields({} if is_null(defaults) else defaults, where)
    for key, value in defaults.items():
        if isinstance(value, list):
            raise ConfigError(
                f"{where.key(key, document['defaults'])}: defaults cannot be lists (grid axes); "
                "move the list into a strategy"
            )
    return defaults


def grid_promotion(document: dict[str, Any], source: str = "<grid>") -> PromotionSettings:
    """Return the checked ``promotion:`` settings of a parsed grid document (defaults if absent).

    Raises ConfigError, naming ``source``, the line and YAML path, for a section that is not a
    mapping or holds an invalid setting (see :func:`~imgcls.core.strategy.check_promotion`).
    """
    if not isinstance(document, dict):
        raise ConfigError(f"{source}: the top level must be a mapping with 'strategies'")
    return check_promotion(document.get("promotion"), Where(source).key("promotion", document))


def expand_grid(document: dict[str, Any], source: str = "<grid>") -> list[Strategy]:
    """Expand a parsed grid document (``defaults`` + ``strategies``) into grid points.

    ``defaults`` or a strategy's deltas may be null (empty): no fields. Raises ConfigError, naming
    ``source``, the line and the YAML path, for a top level that is not a mapping or has unknown
    keys, list values in ``defaults``, missing or empty ``strategies``, a strategy name that is not
    text (null, true/false, a number, a date: quote it), invalid fields (see
    :func:`~imgcls.core.strategy.check_fields`), an ``ensemble`` its grid point cannot train
    (:func:`~imgcls.core.strategy.check_ensemble`, at the ``ensemble`` key's line), or grid
    points whose run names collide.
    """
    if not isinstance(document, dict):
        raise ConfigError(f"{source}: the top level must be a mapping with 'strategies'")
    unknown = set(document) - {"defaults", "strategies", "promotion"}
    if unknown:
        raise ConfigError(
            f"{source}: unknown top-level key(s) {sorted(str(k) for k in unknown)}; "
            "allowed: defaults, strategies, promotion"
        )
    defaults = grid_defaults(document, source)
    defaults_raw = document.get("defaults") if isinstance(document.get("defaults"), dict) else {}
    strategies = document.get("strategies")
    top = Where(source)
    if not isinstance(strategies, dict) or not strategies:
        raise ConfigError(
            f"{top.key('strategies', document)}: expected a non-empty mapping of name -> fields"
        )
    points: list[Strategy] = []
    for key, deltas in strategies.items():
        name = name_of(key, strategies, Where(source, "strategies"))
        where = Where(source, "strategies").key(name, strategies)
        deltas = check_fields({} if is_null(deltas) else deltas, where)
        merged = {**defaults, **deltas}
        axes = {k: v for k, v in merged.items() if isinstance(v, list)}
        fixed = {k: v for k, v in merged.items() if not isinstance(v, list)}
        for combo in itertools.product(*axes.values()) if axes else [()]:
            grid_values = dict(zip(axes.keys(), combo, strict=True))
            point = Strategy(
                name=str(name), extra={"grid_values": grid_values}, **fixed, **grid_values
            )
            raw = strategies[key] if isinstance(strategies[key], dict) else {}
            on = where if "ensemble" in raw else top.key("defaults", document)
            check_ensemble(point, on.key("ensemble", raw if "ensemble" in raw else defaults_raw))
            points.append(point)
    run_names = [p.run_name for p in points]
    duplicates = {n for n in run_names if run_names.count(n) > 1}
    if duplicates:
        raise ConfigError(f"{source}: grid points with identical names: {sorted(duplicates)}")
    return points


def load_grid(path: str | Path, only: list[str] | None = None) -> Grid:
    """Read, validate and expand a grid YAML file; keep only the named strategies if given.

    The file is read strictly as YAML 1.2 (:mod:`imgcls.core.gridfile`). Raises ConfigError,
    naming the file and the line or YAML path, for a missing file, invalid YAML, a ``%YAML``
    directive other than 1.2, a duplicate key (both lines named), anything :func:`expand_grid`
    or :func:`grid_promotion` refuses, or ``only`` naming unknown strategies.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: grid file not found")
    document = read_grid_yaml(path)
    points = expand_grid(document, source=str(path))
    promotion = grid_promotion(document, source=str(path))
    if only:
        known = {p.name for p in points}
        missing = [n for n in only if n not in known]
        if missing:
            raise ConfigError(
                f"{path}: --only names unknown strategies {missing}; known: {sorted(known)}"
            )
        points = [p for p in points if p.name in only]
    return Grid(path=path, strategies=tuple(points), promotion=promotion)


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
