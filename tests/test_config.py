"""Grid files: expansion, validation messages that name the YAML path, run keys."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from imgcls.core import paths
from imgcls.core.config import (
    ConfigError,
    Grid,
    PromotionSettings,
    Strategy,
    check_against_data,
    grid_defaults,
    load_grid,
    run_key,
    strategy_from_dict,
)
from imgcls.core.gridfile import read_grid_yaml


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(text)
    return path


def test_shipped_grid_has_six_strategies_and_eight_points():
    grid = load_grid(paths.REPO_ROOT / "strategies.yaml")
    assert grid.names() == [
        "baseline",
        "longer",
        "learning_rate",
        "finetune",
        "batch_size",
        "ensemble_tta",
    ]
    assert len(grid.strategies) == 8
    ensemble = grid.strategies[-1]
    assert (ensemble.ensemble, ensemble.tta, ensemble.freeze_backbone) == ("folds", "flip", True)
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
        check_against_data(Strategy(folds=5), {"forest": 10, "sea": 3}, "grid.yaml: strategies.s")


def test_run_key_changes_with_params_data_and_code():
    base = run_key(Strategy(), "md5a", "code1")
    assert base == run_key(Strategy(), "md5a", "code1")
    assert base != run_key(Strategy(lr=0.01), "md5a", "code1")
    assert base != run_key(Strategy(), "md5b", "code1")
    assert base != run_key(Strategy(), "md5a", "code2")


# Strict grid files (YAML 1.2, no duplicate keys, no silent null/date/yes-no surprises). Each
# message names the file and the line, then the YAML path (values and names).


def refused(tmp_path: Path, text: str) -> str:
    """Return the ConfigError message that loading ``text`` as a grid file raises."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as error:
        load_grid(path)
    return str(error.value).replace(str(path), "grid.yaml")


def test_duplicate_strategy_names_both_lines(tmp_path):
    text = (
        "defaults:\n  epochs: 2\nstrategies:\n"
        "  baseline: {}\n  longer:\n    epochs: 20\n  baseline:\n    lr: 0.1\n"
    )
    assert refused(tmp_path, text) == (
        "grid.yaml:7: duplicate key 'baseline' (first defined at line 4); each key may appear once"
    )


def test_duplicate_field_inside_a_strategy(tmp_path):
    text = "strategies:\n  s:\n    lr: 0.1\n    epochs: 3\n    lr: 0.01\n"
    assert refused(tmp_path, text) == (
        "grid.yaml:5: duplicate key 'lr' (first defined at line 3); each key may appear once"
    )


def test_duplicate_key_inside_defaults(tmp_path):
    text = "defaults:\n  seed: 1\n  seed: 2\nstrategies:\n  s: {}\n"
    assert refused(tmp_path, text) == (
        "grid.yaml:3: duplicate key 'seed' (first defined at line 2); each key may appear once"
    )


def test_duplicate_top_level_key(tmp_path):
    text = "strategies:\n  a: {}\nstrategies:\n  b: {}\n"
    assert refused(tmp_path, text) == (
        "grid.yaml:3: duplicate key 'strategies' (first defined at line 1); "
        "each key may appear once"
    )


def test_quoted_and_plain_spellings_of_one_name_are_duplicates(tmp_path):
    text = "strategies:\n  baseline: {}\n  'baseline':\n    epochs: 3\n"
    assert refused(tmp_path, text) == (
        "grid.yaml:3: duplicate key 'baseline' (first defined at line 2); each key may appear once"
    )


@pytest.mark.parametrize("name", ["off", "yes", "no", "on"])
def test_yaml_1_1_boolean_words_are_strategy_names(tmp_path, name):
    grid = load_grid(write(tmp_path, f"strategies:\n  {name}:\n    epochs: 3\n"))
    assert grid.names() == [name]
    assert grid.strategies[0].run_name == name


def test_bool_field_given_yes_is_refused_with_a_hint(tmp_path):
    assert refused(tmp_path, "strategies:\n  s:\n    freeze_backbone: yes\n") == (
        "grid.yaml:3: strategies.s.freeze_backbone: expected true or false, got the text 'yes'; "
        "write true or false"
    )


def test_bool_axis_given_off_on_is_refused_with_a_hint(tmp_path):
    assert refused(tmp_path, "strategies:\n  s:\n    augment: [off, on]\n") == (
        "grid.yaml:3: strategies.s.augment[0]: expected true or false, got the text 'off'; "
        "write true or false\n"
        "grid.yaml:3: strategies.s.augment[1]: expected true or false, got the text 'on'; "
        "write true or false"
    )


def test_exponent_floats_without_a_dot_are_numbers(tmp_path):
    text = (
        "defaults:\n  lr: 1e-4\n"
        "strategies:\n  s:\n    weight_decay: 1.0e-5\n  t:\n    lr: [1E-3, 5e-4]\n"
    )
    grid = load_grid(write(tmp_path, text))
    assert [(p.lr, p.weight_decay) for p in grid.strategies] == [
        (0.0001, 1e-05),
        (0.001, 0.0),
        (0.0005, 0.0),
    ]


@pytest.mark.parametrize(
    ("name", "reads_as"),
    [
        ("2024-01-01", "a date"),
        ("2024-01-01 10:00:00", "a date and time"),
        ("~", "null"),
        ("010", "a number"),
        ("1.0", "a number"),
        ("true", "true/false"),
    ],
)
def test_names_yaml_reads_as_non_text_are_refused_with_a_quote_hint(tmp_path, name, reads_as):
    assert refused(tmp_path, f"strategies:\n  {name}:\n    epochs: 3\n") == (
        f'grid.yaml:2: strategies.{name}: YAML reads this name as {reads_as}; quote it ("{name}")'
    )
    grid = load_grid(write(tmp_path, f'strategies:\n  "{name}":\n    epochs: 3\n'))
    assert grid.names() == [name]


@pytest.mark.parametrize(("value", "written"), [("~", "~"), ("null", "null"), ("[0.1, ~]", "~")])
def test_null_field_value_is_refused_with_a_hint(tmp_path, value, written):
    where = "strategies.s.lr[1]" if value.startswith("[") else "strategies.s.lr"
    assert refused(tmp_path, f"strategies:\n  s:\n    lr: {value}\n") == (
        f"grid.yaml:3: {where}: YAML reads '{written}' as null (no value); remove it to keep the "
        f'default, or quote it ("{written}") if you mean the text'
    )


def test_empty_strategy_means_no_deltas_but_an_empty_field_is_refused(tmp_path):
    grid = load_grid(write(tmp_path, "defaults:\nstrategies:\n  s:\n  t: ~\n  u: {}\n"))
    assert grid.names() == ["s", "t", "u"]
    assert all(p.params() == {**Strategy().params(), "name": p.name} for p in grid.strategies)
    assert refused(tmp_path, "strategies:\n  s:\n    weights:\n") == (
        "grid.yaml:3: strategies.s.weights: YAML reads an empty value as null (no value); remove it "
        "to keep the default, or write a value"
    )


def test_date_field_value_is_refused_with_a_quote_hint(tmp_path):
    assert refused(tmp_path, "defaults:\n  weights: 2024-01-01\nstrategies:\n  s: {}\n") == (
        'grid.yaml:2: defaults.weights: YAML reads this value as a date; quote it ("2024-01-01")'
    )


def test_leading_zero_is_decimal_and_sexagesimal_is_text(tmp_path):
    grid = load_grid(write(tmp_path, "strategies:\n  s:\n    seed: 010\n"))
    assert grid.strategies[0].seed == 10
    assert refused(tmp_path, "strategies:\n  s:\n    epochs: 1:30\n") == (
        "grid.yaml:3: strategies.s.epochs: expected int, got str '1:30'; write a whole number"
    )


def test_a_yaml_1_1_directive_is_refused(tmp_path):
    text = "%YAML 1.1\n---\nstrategies:\n  s:\n    freeze_backbone: yes\n"
    assert refused(tmp_path, text) == (
        "grid.yaml: the file declares %YAML 1.1; grid files are read as YAML 1.2 "
        "(yes/no/on/off are text, 010 is 10): remove the %YAML line"
    )


# One default strategy: the schema's defaults; strategies.yaml's `defaults:` only overrides them.


def test_shipped_grid_defaults_are_only_deliberate_overrides_of_the_schema():
    """Each key of strategies.yaml's `defaults:` changes the schema default (none repeats it).

    The schema keeps the default that works (tests/test_realdata.py: >= 95 %); the grid states
    the upstream baseline as overrides, so `baseline: {}` is the schema default plus them.
    """
    path = paths.REPO_ROOT / "strategies.yaml"
    overrides = grid_defaults(read_grid_yaml(path), str(path))
    assert overrides == {"epochs": 2, "patience": 0, "batch_size": 16, "lr": 1e-5}
    for key, value in overrides.items():
        assert value != Strategy.model_fields[key].default, f"defaults.{key} repeats the schema"
    baseline = load_grid(path, only=["baseline"]).strategies[0]
    assert baseline == Strategy(name="baseline", **overrides)
    assert baseline.params() == {**Strategy().params(), **overrides, "name": "baseline"}


def test_notebook_02_opened_by_hand_trains_the_schema_default():
    """The parameters cell of notebook 02, run as it is, gives exactly ``Strategy()``."""
    notebook = json.loads((paths.notebooks_dir() / "02_train_cv.ipynb").read_text())
    cell = next(c for c in notebook["cells"] if "parameters" in c["metadata"].get("tags", []))
    parameters: dict = {}
    exec("".join(cell["source"]), {}, parameters)
    parsed = strategy_from_dict({**parameters["strategy"], "name": parameters["strategy_name"]})
    assert parsed.params() == Strategy().params()
    assert (parsed.epochs, parsed.lr, parsed.batch_size) == (20, 1e-3, 32)


# Schema errors: every problem of a mapping, in file order, each with its line and a fix.


def test_every_problem_is_listed_with_its_line_in_file_order(tmp_path):
    text = "strategies:\n  s:\n    lrr: 0.1\n    augment: [true, 1]\n    backbone: resnet\n"
    assert refused(tmp_path, text) == (
        "grid.yaml:3: strategies.s.lrr: unknown key; did you mean 'lr'? allowed keys: backbone, "
        "weights, freeze_backbone, image_size, folds, seed, epochs, patience, batch_size, "
        "optimizer, lr, weight_decay, momentum, augment, dropout, min_accuracy, "
        "use_feature_cache, ensemble, tta\n"
        "grid.yaml:4: strategies.s.augment[1]: expected bool, got int 1; write true or false\n"
        "grid.yaml:5: strategies.s.backbone: unknown backbone 'resnet'; did you mean 'resnet18'? "
        "allowed: efficientnet_lite0, resnet18"
    )


def test_a_block_list_item_names_its_own_line(tmp_path):
    text = "defaults:\n  seed: 1\nstrategies:\n  s:\n    lr:\n      - 0.1\n      - -1\n"
    assert refused(tmp_path, text) == (
        "grid.yaml:7: strategies.s.lr[1]: learning rate must be > 0, got -1; write a number > 0"
    )


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        (
            "image_size",
            "8",
            "image size (pixels) must be between 32 and 1024, got 8; "
            "write a whole number between 32 and 1024",
        ),
        ("dropout", "1", "dropout must be >= 0 and < 1, got 1; write a number >= 0 and < 1"),
        (
            "min_accuracy",
            "1.5",
            "min_accuracy must be between 0 and 1, got 1.5; write a number between 0 and 1",
        ),
        (
            "patience",
            "-1",
            "patience (epochs without improvement; 0 disables early stopping) "
            "must be >= 0, got -1; write a whole number >= 0",
        ),
        (
            "lr",
            '"0.001"',
            "expected float, got str '0.001'; write a number, unquoted (1e-4 and 0.0001 both work)",
        ),
        ("lr", ".nan", "input should be a finite number, got float nan"),
        ("weights", "1", 'expected str, got int 1; quote it ("1")'),
        ("optimizer", "rmsprop", "unknown optimizer 'rmsprop'; allowed: adam, adamw, sgd"),
        ("epochs", "[]", "an empty list gives no grid points; give a value"),
    ],
)
def test_schema_errors_say_what_is_wrong_and_how_to_fix_it(tmp_path, field, value, message):
    text = f"strategies:\n  s:\n    {field}: {value}\n"
    assert refused(tmp_path, text) == f"grid.yaml:3: strategies.s.{field}: {message}"


def test_a_strategy_given_in_python_is_strict_frozen_and_compared_by_params():
    with pytest.raises(ValidationError, match="greater_than"):
        Strategy(lr=-1.0)
    with pytest.raises(ValidationError, match="extra_forbidden"):
        Strategy(lrr=0.1)
    with pytest.raises(ValidationError, match="frozen"):
        Strategy().lr = 0.1
    assert isinstance(Strategy(lr=1).lr, float)
    point = Strategy(extra={"grid_values": {"lr": 0.001}})
    assert point == Strategy() and hash(point) == hash(Strategy())
    assert point.run_name == "default-lr=0.001" and "extra" not in point.params()
    with pytest.raises(ConfigError) as error:
        strategy_from_dict({"freeze_backbone": "yes", "epochs": 0})
    assert str(error.value) == (
        "strategy.freeze_backbone: expected true or false, got the text 'yes'; write true or false"
        "\nstrategy.epochs: epochs must be >= 1, got 0; write a whole number >= 1"
    )


# The `promotion:` section: when the grid's best point replaces the previous champion.


def test_promotion_defaults_when_the_section_is_absent_or_empty(tmp_path):
    shipped = load_grid(paths.REPO_ROOT / "strategies.yaml")
    assert shipped.promotion == PromotionSettings()
    assert (shipped.promotion.rope, shipped.promotion.alpha, shipped.promotion.metric) == (
        0.005,
        0.05,
        "fold_val_accuracy",
    )
    empty = load_grid(write(tmp_path, "promotion:\nstrategies:\n  s: {}\n"))
    assert empty.promotion == PromotionSettings()
    assert Grid(None, ()).promotion == PromotionSettings()


def test_promotion_settings_are_read_and_change_no_grid_point(tmp_path):
    plain = load_grid(write(tmp_path, "strategies:\n  s:\n    lr: [0.1, 0.01]\n"))
    text = "promotion:\n  rope: 0\n  alpha: 0.1\n  metric: fold_val_accuracy\n"
    grid = load_grid(write(tmp_path, text + "strategies:\n  s:\n    lr: [0.1, 0.01]\n"))
    assert grid.promotion == PromotionSettings(rope=0.0, alpha=0.1)
    assert isinstance(grid.promotion.rope, float)  # an int is taken as a float
    assert [run_key(s, "md5", "code") for s in grid.strategies] == [
        run_key(s, "md5", "code") for s in plain.strategies
    ]


@pytest.mark.parametrize(
    ("section", "message"),
    [
        (
            "  rope: 1\n",
            "grid.yaml:2: promotion.rope: rope (region of practical equivalence, a fraction of "
            "accuracy) must be >= 0 and < 1, got 1; write a number >= 0 and < 1",
        ),
        (
            "  alpha: 0.5\n",
            "grid.yaml:2: promotion.alpha: alpha (error rate of each one-sided test) must be > 0 "
            "and < 0.5, got 0.5; write a number > 0 and < 0.5",
        ),
        (
            "  rope: 0.01\n  alpah: 0.1\n",
            "grid.yaml:3: promotion.alpah: unknown key; did you mean 'alpha'? "
            "allowed keys: rope, alpha, metric",
        ),
        (
            "  metric: accuracy\n",
            "grid.yaml:2: promotion.metric: unknown metric 'accuracy'; did you mean "
            "'fold_val_accuracy'? allowed: fold_val_accuracy",
        ),
        (
            '  rope: "0.01"\n',
            "grid.yaml:2: promotion.rope: expected float, got str '0.01'; write a number, "
            "unquoted (1e-4 and 0.0001 both work)",
        ),
        (
            "  rope: [0.005, 0.01]\n",
            "grid.yaml:2: promotion.rope: promotion settings cannot be lists (grid axes); "
            "give one value",
        ),
        (
            "  alpha: ~\n",
            "grid.yaml:2: promotion.alpha: YAML reads '~' as null (no value); remove it to keep "
            'the default, or quote it ("~") if you mean the text',
        ),
        (
            "  rope: -0.1\n  alpha: 0\n",
            "grid.yaml:2: promotion.rope: rope (region of practical equivalence, a fraction of "
            "accuracy) must be >= 0 and < 1, got -0.1; write a number >= 0 and < 1\n"
            "grid.yaml:3: promotion.alpha: alpha (error rate of each one-sided test) must be > 0 "
            "and < 0.5, got 0; write a number > 0 and < 0.5",
        ),
    ],
)
def test_promotion_errors_name_the_line_and_yaml_path(tmp_path, section, message):
    assert refused(tmp_path, f"promotion:\n{section}strategies:\n  s: {{}}\n") == message


def test_a_promotion_section_that_is_not_a_mapping_is_refused(tmp_path):
    assert refused(tmp_path, "strategies:\n  s: {}\npromotion: 0.01\n") == (
        "grid.yaml:3: promotion: expected a mapping of promotion settings (rope, alpha, metric), "
        "got 0.01"
    )
    assert "allowed: defaults, strategies, promotion" in refused(
        tmp_path, "promotoin:\n  rope: 0.01\nstrategies:\n  s: {}\n"
    )
