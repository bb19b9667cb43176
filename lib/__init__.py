"""Sea-vs-Forest experiment library: everything the notebooks and the runner use."""

import os

# Progress bars of artifact downloads clutter notebook reports; the pipeline prints its own.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
