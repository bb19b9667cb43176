"""Grid files: expansion, validation messages that name the YAML path, run keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from lib import paths
from lib.config import ConfigError, Strategy, check_against_data, load_grid, run_key


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(text)
    return path


def test_shipped_grid_has_five_strategies_and_seven_points():
    grid = load_grid(paths.REPO_ROOT / "strategies.yaml")
    assert grid.names() == ["baseline", "longer", "learning_rate", "finetune", "batch_size"]
    assert len(grid.strategies) == 7
    baseline = grid.strategies[0]
    assert (baseline.freeze_backbone, baseline.epochs, baseline.lr, baseline.batch_size) == (
        True,
        2,
        1e-5,
        16,
    )
    assert (baseline.optimizer, baseline.folds) == ("adam", 5)
    lrs = sorted(s.lr for s in grid.strategies if s.name == "learning_rate")
    assert lrs == [1e-4, 1e-3]
    finetune = [s for s in grid.strategies if s.name == "finetune"]
    assert {s.augment for s in finetune} == {False, True}
    assert all(not s.freeze_backbone for s in finetune)


def test_list_values_expand_to_a_product(tmp_path):
    grid = load_grid(
        write(tmp_path, "strategies:\n  s:\n    lr: [0.1, 0.01]\n    epochs: [1, 2, 3]\n")
    )
    assert len(grid.strategies) == 6
    assert len({s.run_name for s in grid.strategies}) == 6


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("strategies:\n  s:\n    lrr: 0.1\n", "strategies.s.lrr: unknown key"),
        ("strategies:\n  s:\n    epochs: ten\n", "strategies.s.epochs: expected int, got str"),
        ("strategies:\n  s:\n    lr: -0.1\n", "strategies.s.lr: learning rate must be > 0"),
        ("strategies:\n  s:\n    lr: [0.1, -1]\n", "strategies.s.lr[1]: learning rate must be > 0"),
        ("strategies:\n  s:\n    optimizer: rmsprop\n", "allowed: adam, adamw, sgd"),
        ("strategies:\n  s:\n    backbone: vgg\n", "allowed: efficientnet_lite0, resnet18"),
        ("strategies:\n  s:\n    freeze_backbone: 1\n", "expected bool, got int"),
        ("strategies:\n  s:\n    epochs: true\n", "expected int, got bool"),
        ("defaults:\n  folds: 1\nstrategies:\n  s: {}\n", "defaults.folds: k-fold"),
        ("strategie:\n  s: {}\n", "unknown top-level key"),
        ("strategies: {}\n", "non-empty mapping"),
        ("strategies:\n  s: [1, 2]\n", "expected a mapping"),
    ],
)
def test_invalid_grids_name_the_yaml_path(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as error:
        load_grid(path)
    assert expected in str(error.value)
    assert str(path) in str(error.value)


def test_unknown_key_lists_allowed_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"allowed keys: .*backbone.*lr"):
        load_grid(write(tmp_path, "strategies:\n  s:\n    lrr: 0.1\n"))


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_grid(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_grid(write(tmp_path, "strategies: [\n"))


def test_only_filters_and_rejects_unknown_names():
    grid = load_grid(paths.REPO_ROOT / "strategies.yaml", only=["finetune"])
    assert {s.name for s in grid.strategies} == {"finetune"}
    with pytest.raises(ConfigError, match="unknown strategies"):
        load_grid(paths.REPO_ROOT / "strategies.yaml", only=["nope"])


def test_folds_larger_than_smallest_class_is_refused():
    with pytest.raises(ConfigError, match="class 'sea' has only 3"):
        check_against_data(Strategy(folds=5), {"forest": 10, "sea": 3}, "grid.yaml:strategies.s")


def test_run_key_changes_with_params_data_and_code():
    base = run_key(Strategy(), "md5a", "code1")
    assert base == run_key(Strategy(), "md5a", "code1")
    assert base != run_key(Strategy(lr=0.01), "md5a", "code1")
    assert base != run_key(Strategy(), "md5b", "code1")
    assert base != run_key(Strategy(), "md5a", "code2")
