"""Names that reach MLflow (lib/imgcls/core/names.py), held against a real SQLite MLflow store, and the CLI.

Every mapped metric key is logged with ``MlflowClient().log_metric`` and every registered model
name is created with ``MlflowClient().create_registered_model``: the rules in lib/imgcls/core/names.py are
restated from MLflow, so MLflow itself is the judge here.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

import run_experiments
from imgcls.core import names, paths
from imgcls.core.names import InvalidNameError
from imgcls.evaluation import metrics
from tests.conftest import write_dataset

# Class folder names a user may well have: spaces, parentheses, '&', '+', ',', "'", '@', accents.
CLASS_KEYS = {
    "sea (coast)": "sea_coast",
    "forêt & bois": "foret_bois",
    "mountain + snow, alpine": "mountain_snow_alpine",
    "l'été @ la plage": "l_ete_la_plage",
    "désert — dunes": "desert_dunes",
    "Ångström.v2-b": "Angstrom.v2-b",
    "plain_name": "plain_name",
}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One SQLite store for the module: creating its schema costs ~6 s, so it is made once."""
    return tmp_path_factory.mktemp("names-store")


@pytest.fixture()
def client(store: Path) -> MlflowClient:
    """A client on the module's SQLite store (every test uses its own run or model names)."""
    mlflow.set_tracking_uri(f"sqlite:///{store / 'mlflow.db'}")
    return MlflowClient()


@pytest.fixture()
def run_id(client: MlflowClient, store: Path) -> str:
    """A new run of its own for each test."""
    experiment = client.get_experiment_by_name("names")
    experiment_id = (
        experiment.experiment_id
        if experiment
        else client.create_experiment("names", artifact_location=(store / "a").as_uri())
    )
    return client.create_run(experiment_id).info.run_id


# --------------------------------------------------------------------------- metric keys


@pytest.mark.parametrize(("name", "key"), list(CLASS_KEYS.items()))
def test_class_name_maps_to_a_key_mlflow_accepts(name, key, client, run_id):
    assert names.metric_key(name) == key
    for metric in ("precision", "recall", "f1"):
        client.log_metric(run_id, f"test_{metric}_{key}", 0.5)
    logged = client.get_run(run_id).data.metrics
    assert logged[f"test_precision_{key}"] == 0.5
    if set(name) & set(" ()&+,'@—"):  # issue 10: MLflow refused the raw name in a metric key
        with pytest.raises(mlflow.exceptions.MlflowException, match="Invalid value"):
            client.log_metric(run_id, f"test_precision_{name}", 0.5)


def test_classification_metrics_emit_mapped_keys_that_mlflow_logs(client, run_id):
    classes = list(CLASS_KEYS)
    y = np.arange(len(classes)).repeat(2)
    probabilities = np.eye(len(classes))[y] * 0.5 + 0.5 / len(classes)
    scores = metrics.classification_metrics(y, probabilities, classes)
    for name, key in CLASS_KEYS.items():
        assert scores[f"recall_{key}"] == 1.0, name
        if name != key:
            assert not any(name in k for k in scores), name
    client.log_batch(
        run_id,
        metrics=[mlflow.entities.Metric(k, v, 0, 0) for k, v in scores.items()],
    )
    assert set(client.get_run(run_id).data.metrics) == set(scores)
    # tables keep the names people read
    table = metrics.per_class_table(y, probabilities, classes)
    assert list(table.index) == classes
    confusion = metrics.confusion(y, probabilities.argmax(1), classes)
    assert list(confusion.columns) == [f"predicted: {name}" for name in classes]


def test_two_folders_with_the_same_key_are_refused_naming_both_and_the_folder():
    with pytest.raises(InvalidNameError) as error:
        names.class_metric_keys(["forest", "sea (coast)", "sea_coast"], "/data/train")
    message = str(error.value)
    assert message.startswith("/data/train: class folders 'sea (coast)' and 'sea_coast'")
    assert "'sea_coast'" in message and "\n" not in message
    with pytest.raises(InvalidNameError, match="'forêt' and 'foret'"):
        metrics.classification_metrics(np.array([0]), np.array([[0.9, 0.1]]), ["forêt", "foret"])


@pytest.mark.parametrize("name", ["()", "森林", "...", " @ "])
def test_a_class_that_maps_to_nothing_is_refused(name):
    with pytest.raises(InvalidNameError, match="gives no MLflow metric key"):
        names.class_metric_keys(["forest", name], "/data/train")


def test_eval_set_prefixes_are_mlflow_keys_and_may_not_collide(client, run_id):
    prefixes = names.eval_set_prefixes(["../phone photos", "data/été.v2"])
    assert prefixes == {"../phone photos": "phone_photos", "data/été.v2": "data_ete.v2"}
    for prefix in prefixes.values():
        client.log_metric(run_id, f"{prefix}_accuracy", 1.0)
    with pytest.raises(InvalidNameError, match=r"'./test' would log its metrics as 'test_\*'"):
        names.eval_set_prefixes(["./test"])
    with pytest.raises(InvalidNameError, match=r"'a b' would log .* like --eval-dir 'a_b'"):
        names.eval_set_prefixes(["a_b", "a b"])
    with pytest.raises(InvalidNameError, match="'x' is given twice"):
        names.eval_set_prefixes(["x", "x"])
    with pytest.raises(InvalidNameError, match="--eval-dir '/'"):
        names.eval_set_prefixes(["/"])


def test_keys_longer_than_mlflow_allows_are_refused_before_anything_runs(client, run_id):
    long_class = "a" * 236
    with pytest.raises(InvalidNameError, match="has 251 characters, MLflow allows 250"):
        names.check_metric_names(["b", long_class], "/data/train", [])
    # the longest key that passes the check is accepted by MLflow
    fits = "a" * (250 - len("test_precision_"))
    assert names.check_metric_names([fits, "b"], "/data/train", []) == {fits: fits, "b": "b"}
    client.log_metric(run_id, f"test_precision_{fits}", 1.0)
    with pytest.raises(InvalidNameError, match="leaves no room"):
        names.check_metric_names(["a", "b"], "/data/train", ["p" * 220])


# --------------------------------------------------------------------------- registered models


@pytest.mark.parametrize(
    ("experiment", "expected"),
    [
        ("vision-team/sea-forest", "vision-team-sea-forest-classifier"),
        ("team:a/b", "team-a-b-classifier"),
        ("a//b::c", "a-b-c-classifier"),
        ("../up", "up-classifier"),
        ("50% off\\x", "50-off-x-classifier"),
        ("team : model", "team-model-classifier"),
        ("sea vs forêt", "sea vs forêt-classifier"),  # accepted by MLflow: kept
        ("sea-vs-forest", "sea-vs-forest-classifier"),
    ],
)
def test_default_model_name_is_registered_for_real(experiment, expected, client):
    name = names.registered_model_name(experiment, None)
    assert name == expected
    assert client.create_registered_model(name).name == name
    if set(experiment) & set("/:"):  # issue 10: the registry refused the unmapped default
        with pytest.raises(mlflow.exceptions.MlflowException, match="cannot contain '/' or ':'"):
            client.create_registered_model(f"{experiment}-classifier")


@pytest.mark.parametrize(
    ("explicit", "suggestion"),
    [
        ("a/b", "a-b"),
        ("team:model", "team-model"),
        ("my team/model", "my team-model"),  # suggested quoted for the shell
        ("..", None),
        ("../x", "x"),
        ("", None),
    ],
)
def test_explicit_model_name_mlflow_refuses_is_refused_with_a_suggestion(
    explicit, suggestion, client
):
    with pytest.raises(mlflow.exceptions.MlflowException):
        client.create_registered_model(explicit)  # MLflow refuses it too
    with pytest.raises(InvalidNameError) as error:
        names.registered_model_name("sea-vs-forest", explicit)
    message = str(error.value)
    assert message.startswith(f"--model-name {explicit!r}: ")
    if suggestion:
        assert message.endswith(f"use --model-name {shlex.quote(suggestion)}")
        assert client.create_registered_model(suggestion).name == suggestion
    else:
        assert message.endswith("choose another --model-name")


def test_explicit_model_name_mlflow_accepts_is_kept(client):
    for explicit in ("My Model", "forêt-v2", "team.model_1"):
        assert names.registered_model_name("vision-team/sea-forest", explicit) == explicit
        assert client.create_registered_model(explicit).name == explicit


def test_an_experiment_that_gives_no_model_name_is_refused():
    with pytest.raises(InvalidNameError, match="--experiment '///': gives no usable"):
        names.registered_model_name("///", None)
    with pytest.raises(InvalidNameError, match="MLflow refuses an empty experiment name"):
        names.check_experiment_name("")


# --------------------------------------------------------------------------- the command line

GRID = """
defaults:
  backbone: resnet18
  weights: none
  image_size: 32
  folds: 2
strategies:
  s: {}
"""


def _dataset(root: Path, classes: tuple[str, str] = ("forest", "sea")) -> Path:
    """train/ and test/ with two learnable classes (folder names as given)."""
    for split, count, seed in (("train", 6, 1), ("test", 2, 2)):
        write_dataset(root / split, {"forest": count, "sea": count}, seed=seed, size=32)
        for kind, name in zip(("forest", "sea"), classes, strict=True):
            if name != kind:
                (root / split / kind).rename(root / split / name)
    return root


@pytest.fixture()
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Throwaway reports, artifacts and caches (also for a subprocess)."""
    for variable, sub in [
        ("IMGCLS_REPORTS_DIR", "reports"),
        ("IMGCLS_ARTIFACT_ROOT", "artifacts"),
        ("IMGCLS_CACHE_DIR", "cache"),
    ]:
        monkeypatch.setenv(variable, str(tmp_path / sub))
    return dict(os.environ)


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(paths.REPO_ROOT / "run_experiments.py"), *args],
        cwd=paths.REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_dry_run_with_a_slash_in_the_experiment_prints_the_mapped_model_name(tmp_path, env):
    data = _dataset(tmp_path / "data", ("forêt & bois", "sea (coast)"))
    store = tmp_path / "m.db"
    args = ["--dry-run", "--experiment", "vision-team/sea-forest", "--data-dir", str(data)]
    result = _run([*args, "--tracking-uri", f"sqlite:///{store}"], env)
    assert result.returncode == 0, result.stderr
    assert "models:/vision-team-sea-forest-classifier@champion" in result.stdout
    assert "dry run: nothing executed" in result.stdout


def test_bad_model_name_exits_2_with_one_line_and_no_traceback(tmp_path, env):
    data = _dataset(tmp_path / "data")
    store = tmp_path / "m.db"
    args = ["--dry-run", "--model-name", "a/b", "--data-dir", str(data)]
    result = _run([*args, "--tracking-uri", f"sqlite:///{store}"], env)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        "error: --model-name 'a/b': MLflow's model registry refuses '/' in a registered model "
        "name; use --model-name a-b"
    ]
    assert not store.exists()


@pytest.fixture()
def cli(tmp_path, env, capsys):
    """Call run_experiments.main in-process; return (exit code, stderr); nothing is created."""
    grid = tmp_path / "grid.yaml"
    grid.write_text(GRID)
    store = tmp_path / "mlflow.db"

    def call(*args: str, data: Path | None = None, uri: str | None = None) -> tuple[int, str]:
        argv = ["--grid", str(grid), "--tracking-uri", uri or f"sqlite:///{store}", *args]
        if data is not None:
            argv += ["--data-dir", str(data)]
        try:
            code = run_experiments.main(argv)
        except SystemExit as exit_:  # argparse refuses an option inside parse_args
            code = exit_.code
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and err.startswith("error: "), err
        for left in (store, tmp_path / "reports"):
            assert not left.exists(), f"{left} created before validation failed"
        return code, err.strip()

    return call


def test_class_folders_that_collide_are_refused_by_the_dry_run(cli, tmp_path):
    data = _dataset(tmp_path / "data", ("sea_coast", "sea (coast)"))
    code, err = cli("--dry-run", data=data)
    assert code == 2
    assert err == (
        f"error: {data / 'train'}: class folders 'sea (coast)' and 'sea_coast' both give the "
        "MLflow metric key 'sea_coast' (precision_sea_coast, ...); rename one of them"
    )


def test_class_folder_without_a_key_is_refused_by_the_dry_run(cli, tmp_path):
    data = _dataset(tmp_path / "data", ("forest", "森林"))
    code, err = cli("--dry-run", data=data)
    assert code == 2
    assert err.startswith(f"error: {data / 'train'}: class folder '森林' gives no MLflow metric")


def test_eval_dir_that_would_overwrite_the_test_metrics_is_refused(cli, tmp_path):
    data = _dataset(tmp_path / "data")
    code, err = cli("--dry-run", "--eval-dir", "./test", data=data)
    assert code == 2 and "--eval-dir './test' would log its metrics as 'test_*'" in err


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--experiment", ""], "error: --experiment '': MLflow refuses an empty experiment name"),
        (["--experiment", "///"], "error: --experiment '///': gives no usable registered model"),
        (["--model-name", "x:y", "--no-register"], "error: --model-name 'x:y': MLflow's model"),
        (["--workers", "0"], "error: --workers 0: must be >= 1 (see --help)"),
        (["--device", "gpu"], "error: --device 'gpu': expected cpu, cuda, cuda:N"),
        (["--scheduler", "tcp://h:1"], "error: --scheduler tcp://h:1: needs --executor dask"),
        (["--no-such-option"], "error: unrecognized arguments: --no-such-option"),
    ],
)
def test_bad_option_values_end_in_one_error_line(args, expected, cli, tmp_path):
    code, err = cli(*args, data=_dataset(tmp_path / "data"))
    assert code == 2
    assert err.startswith(expected), err


def test_argparse_errors_are_one_line_in_the_real_process(tmp_path, env):
    result = _run(["--workers", "0"], env)
    assert result.returncode == 2
    assert result.stderr == "error: --workers 0: must be >= 1 (see --help)\n"


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("foo://bar", "foo://bar: cannot use this MLflow store (Model registry functionality"),
        ("sqlite:////proc/no/such/m.db", "sqlite:////proc/no/such/m.db: cannot use this MLflow"),
    ],
)
def test_unusable_tracking_store_is_one_line_naming_the_uri(uri, expected, cli, tmp_path):
    code, err = cli("--dry-run", data=_dataset(tmp_path / "data"), uri=uri)
    assert code == 2 and err.startswith(f"error: {expected}"), err


def test_binary_grid_file_is_one_line_naming_the_file(cli, tmp_path):
    data = _dataset(tmp_path / "data")
    grid = tmp_path / "grid.yaml"
    grid.write_bytes(b"\xff\xd8\xff\xe0 not yaml")
    code, err = cli("--dry-run", "--grid", str(grid), data=data)
    assert code == 2 and err.startswith(f"error: {grid}: not a UTF-8 text file"), err


def test_deleted_experiment_is_refused_before_anything_runs(tmp_path, env, capsys):
    data = _dataset(tmp_path / "data")
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    grid = tmp_path / "grid.yaml"
    grid.write_text(GRID)
    client = MlflowClient(uri)
    client.delete_experiment(
        client.create_experiment("gone", artifact_location=(tmp_path / "a").as_uri())
    )
    argv = ["--grid", str(grid), "--tracking-uri", uri, "--data-dir", str(data)]
    capsys.readouterr()  # MLflow's own log lines while the store above was made
    code = run_experiments.main([*argv, "--experiment", "gone", "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith(f"error: {uri}: experiment 'gone' is deleted; restore it"), err
