"""Classify images with a registered model: ``python -m lib.predict PATH... [--csv out.csv]``.

PATH may be image files or folders (searched recursively). The default model is the champion
of the default experiment: ``models:/sea-vs-forest-classifier@champion``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from lib import tracking
from lib.data import IMAGE_EXTENSIONS

DEFAULT_MODEL = f"models:/{tracking.DEFAULT_EXPERIMENT}-classifier@champion"


def collect_images(inputs: list[str]) -> list[Path]:
    """Expand files and folders into a sorted list of image files; raise on a missing path."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            found += sorted(
                p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
            )
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
    return found


def predict_paths(paths: list[Path], model_uri: str = DEFAULT_MODEL) -> pd.DataFrame:
    """Load the pyfunc model and return one row per image: path, class, confidence, probabilities."""
    import mlflow

    model = mlflow.pyfunc.load_model(model_uri)
    frame = model.predict(pd.DataFrame({"image": [str(p) for p in paths]}))
    frame.insert(0, "path", [str(p) for p in paths])
    return frame


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; return the exit code."""
    parser = argparse.ArgumentParser(description="Classify images with a registered model.")
    parser.add_argument("paths", nargs="+", help="image files or folders")
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"model URI (default {DEFAULT_MODEL})"
    )
    parser.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: the repository store)"
    )
    parser.add_argument("--csv", type=Path, help="also write the predictions to this CSV file")
    args = parser.parse_args(argv)
    uri = tracking.configure(args.tracking_uri)
    try:
        images = collect_images(args.paths)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not images:
        print("error: no images found in the given paths", file=sys.stderr)
        return 2
    frame = predict_paths(images, args.model)
    for row in frame.itertuples(index=False):
        print(f"{row.path}\t{row.predicted_class}\t{row.confidence:.4f}")
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        frame.to_csv(args.csv, index=False)
        print(f"wrote {len(frame)} predictions to {args.csv}")
    print(f"model {args.model} from {uri}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
