"""Classify images with a registered model: ``python -m imgcls.serving.predict PATH... [--csv out.csv]``.

PATH may be image files or folders. Folders are listed by the dataset rule
(:func:`imgcls.data.folders.dataset_files`: hidden files and folders, ``._*`` AppleDouble files,
``Thumbs.db``, ``desktop.ini`` and ``__MACOSX`` are skipped; links are followed) and only files
with an image extension are taken. Files that cannot be read as images are reported by path
with the reason and get ``status`` ``error: ...`` in the CSV; the others are predicted
(``status`` ``ok``). ``--strict`` makes any unreadable file an error (exit 2, nothing written).
The default model is the champion of the default experiment:
``models:/sea-vs-forest-classifier@champion``.

Exit codes: 0 every image predicted, 1 some files unreadable (the rest predicted and written),
2 invalid input (no such path, no images, model not found, ``--strict`` with a bad file).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from imgcls import tracking
from imgcls.core.names import registered_model_name
from imgcls.data.folders import IMAGE_EXTENSIONS, DataError, dataset_files

# the champion of the default experiment, named by the one registry-name rule
DEFAULT_MODEL = f"models:/{registered_model_name(tracking.DEFAULT_EXPERIMENT)}@champion"
BATCH_SIZE = 32


def collect_images(inputs: list[str]) -> list[Path]:
    """Expand files and folders into image files (folders by the dataset listing rule).

    A file named explicitly is taken whatever its name; folders contribute the files with an
    image extension (:data:`imgcls.data.folders.IMAGE_EXTENSIONS`). Raises FileNotFoundError naming a path
    that does not exist, DataError for a broken or looping link inside a folder.
    """
    found: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            found += [p for p in dataset_files(path) if p.suffix.lower() in IMAGE_EXTENSIONS]
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
    return found


def predict_paths(paths: list[Path], model_uri: str = DEFAULT_MODEL) -> pd.DataFrame:
    """Predict every file; return one row per path in input order.

    Columns: ``path``, ``status`` (``ok`` or ``error: <reason>``), ``predicted_class``,
    ``confidence`` and ``prob_<class>`` (empty where the file could not be read). The files are
    read here and sent to the model as bytes (base64), in batches of :data:`BATCH_SIZE`; a batch
    with an unreadable file is retried one file at a time so that only that file fails.
    Raises ``mlflow.exceptions.MlflowException`` when the model cannot be loaded.
    """
    import mlflow

    from imgcls.serving.pyfunc import file_value

    model = mlflow.pyfunc.load_model(model_uri)

    def predict_one_by_one(chunk: list[Path]) -> list[pd.DataFrame]:
        rows = []
        for path in chunk:
            try:
                frame = model.predict(pd.DataFrame({"image": [file_value(path)]}))
                frame.insert(0, "status", "ok")
            except Exception as exc:  # reported per file, as the CLI promises
                cause = exc.__cause__ if exc.__cause__ is not None else exc
                reason = getattr(cause, "reason", None) or str(exc).split("\n")[0]
                frame = pd.DataFrame({"status": [f"error: {reason}"]})
            rows.append(frame)
        return rows

    parts: list[pd.DataFrame] = []
    for start in range(0, len(paths), BATCH_SIZE):
        chunk = paths[start : start + BATCH_SIZE]
        try:
            frame = model.predict(pd.DataFrame({"image": [file_value(p) for p in chunk]}))
            frame.insert(0, "status", "ok")
            parts.append(frame)
        except Exception:  # isolate the bad file(s) of this batch
            parts += predict_one_by_one(chunk)
    result = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    result.insert(0, "path", [str(p) for p in paths])
    return result


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; return the exit code (see the module docstring)."""
    parser = argparse.ArgumentParser(description="Classify images with a registered model.")
    parser.add_argument("paths", nargs="+", help="image files or folders")
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"model URI (default {DEFAULT_MODEL})"
    )
    parser.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: the repository store)"
    )
    parser.add_argument("--csv", type=Path, help="also write the predictions to this CSV file")
    parser.add_argument(
        "--strict", action="store_true", help="any unreadable file is an error (exit 2)"
    )
    args = parser.parse_args(argv)
    uri = tracking.configure(args.tracking_uri)
    try:
        images = collect_images(args.paths)
    except (FileNotFoundError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not images:
        print(
            f"error: no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {args.paths}",
            file=sys.stderr,
        )
        return 2
    if args.strict:
        from imgcls.data.images import check_image

        bad = [(p, reason) for p in images if (reason := check_image(p))]
        if bad:
            for path, reason in bad:
                print(f"error: {path}: {reason}", file=sys.stderr)
            print(
                f"error: {len(bad)} unreadable file(s) with --strict; nothing predicted",
                file=sys.stderr,
            )
            return 2
    from mlflow.exceptions import MlflowException

    try:
        frame = predict_paths(images, args.model)
    except (MlflowException, OSError) as exc:  # a wrong model URI or store is the user's input
        first = str(exc).strip().split("\n")[0]
        print(f"error: cannot load model {args.model} from {uri}: {first}", file=sys.stderr)
        return 2
    failed = frame[frame["status"] != "ok"]
    for row in frame.itertuples(index=False):
        if row.status == "ok":
            print(f"{row.path}\t{row.predicted_class}\t{row.confidence:.4f}")
        else:
            print(f"{row.path}\t{row.status}", file=sys.stderr)
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        frame.to_csv(args.csv, index=False)
        print(f"wrote {len(frame)} rows ({len(frame) - len(failed)} predicted) to {args.csv}")
    print(f"model {args.model} from {uri}", file=sys.stderr)
    if len(failed):
        print(f"{len(failed)} file(s) could not be read (listed above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
