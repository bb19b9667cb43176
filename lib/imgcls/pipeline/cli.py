"""Run the experiment grid: papermill notebooks per strategy, MLflow tracking, HTML reports.

The command line of ``python run_experiments.py`` (a shim that calls :func:`main`) and of the
``imgcls-run`` console script (pyproject.toml ``[project.scripts]``): both parse the same options
and return the same exit codes. Example: ``imgcls-run --grid strategies.yaml`` (see ``--help``).
"""

from __future__ import annotations

import argparse
import re
import signal
import sys
from pathlib import Path
from typing import NoReturn

from imgcls.core.config import ConfigError
from imgcls.core.names import InvalidNameError
from imgcls.data.folders import DataError
from imgcls.pipeline.notebooks import NotebookParameterError
from imgcls.pipeline.plan import RunnerOptions
from imgcls.pipeline.runner import run_grid
from imgcls.tracking import DEFAULT_EXPERIMENT, TrackingError

EXIT_INVALID_INPUT = 2
EXIT_INTERRUPTED = 130
# torch device strings this pipeline can use (checked here: the runner never imports torch)
DEVICE = re.compile(r"^(cpu|mps|(cuda|xpu)(:\d+)?)$")


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, ``error: ...``, with exit code 2."""

    def error(self, message: str) -> NoReturn:
        """Print ``error: <message> (see --help)`` to stderr and exit 2."""
        self.exit(EXIT_INVALID_INPUT, f"error: {message} (see --help)\n")


def parse_args(argv: list[str] | None = None) -> RunnerOptions:
    """Parse the command line into RunnerOptions; a bad option exits 2 with one ``error:`` line."""
    parser = _Parser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--grid",
        type=Path,
        default=Path("strategies.yaml"),
        help="grid YAML file (default: strategies.yaml)",
    )
    parser.add_argument(
        "--only", action="append", metavar="NAME", help="run only this strategy (repeatable)"
    )
    parser.add_argument("--dry-run", action="store_true", help="validate and print the plan only")
    parser.add_argument("--force", action="store_true", help="re-run grid points already finished")
    parser.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI "
        "or sqlite:///mlflow.db in the repository)",
    )
    parser.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="MLflow experiment name")
    parser.add_argument("--workers", type=int, default=1, help="grid points run in parallel")
    parser.add_argument(
        "--executor",
        choices=["local", "dask"],
        default="local",
        help="local processes (default) or a Dask cluster",
    )
    parser.add_argument(
        "--scheduler",
        help="Dask scheduler address tcp://HOST:PORT "
        "(default with --executor dask: a LocalCluster)",
    )
    parser.add_argument("--data-dir", help="dataset root with train/ and test/ (default: data/)")
    parser.add_argument(
        "--skip-bad-images",
        action="store_true",
        help="leave out unreadable images (counted in MLflow) instead of failing",
    )
    parser.add_argument(
        "--eval-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="extra labelled folder to evaluate every model on (repeatable)",
    )
    parser.add_argument(
        "--gate",
        action="store_true",
        help="exit non-zero (3) when the champion fails its quality gate",
    )
    parser.add_argument(
        "--no-register",
        action="store_true",
        help="do not register the champion in the model registry",
    )
    parser.add_argument(
        "--model-name", help="registered model name (default: <experiment>-classifier)"
    )
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers {args.workers}: must be >= 1")
    if args.device is not None and not DEVICE.match(args.device):
        parser.error(f"--device {args.device!r}: expected cpu, cuda, cuda:N, mps, xpu or xpu:N")
    if args.scheduler and args.executor != "dask":
        parser.error(f"--scheduler {args.scheduler}: needs --executor dask")
    return RunnerOptions(
        grid=args.grid,
        only=args.only,
        dry_run=args.dry_run,
        force=args.force,
        tracking_uri=args.tracking_uri,
        experiment=args.experiment,
        workers=args.workers,
        executor=args.executor,
        scheduler=args.scheduler,
        data_dir=args.data_dir,
        skip_bad_images=args.skip_bad_images,
        extra_eval_dirs=args.eval_dir,
        gate=args.gate,
        register=not args.no_register,
        model_name=args.model_name,
        device=args.device,
    )


def install_signal_handlers() -> None:
    """Make SIGINT (Ctrl-C, ``kill -INT``) and SIGTERM stop the run, whatever was inherited.

    Both get Python's own ``signal.default_int_handler``, which raises KeyboardInterrupt in the
    main thread: unfinished runs are marked KILLED and the exit code is 130. SIGINT is set too
    because a shell without job control (a script's ``python run_experiments.py ... &``, some
    CI runners) starts background commands with SIGINT ignored (POSIX Shell Command Language,
    2.11 "Signals and Error Handling"), and Python leaves an inherited SIG_IGN in place (Python
    docs, ``signal``: SIGINT becomes KeyboardInterrupt only "if the parent process has not
    changed it"); the runner then ran its whole grid through a Ctrl-C. Must be called from the
    main thread.
    """
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.default_int_handler)


def main(argv: list[str] | None = None) -> int:
    """Run the grid; return the process exit code (README: 0 ok, 1 a notebook failed, 2 invalid
    input, 3 gate failed, 130 interrupted).

    Invalid input (options, names, grid file, data, tracking store) ends in one line
    ``error: ...`` on stderr naming the file, folder or option, and exit code 2; any other
    exception is a bug and keeps its traceback.
    """
    options = parse_args(argv)
    install_signal_handlers()
    try:
        return run_grid(options)
    except (
        ConfigError,
        DataError,
        InvalidNameError,
        TrackingError,
        NotebookParameterError,
        FileNotFoundError,
    ) as exc:
        message = re.sub(r"\s*\n\s*", " ", str(exc).strip())  # one line, whatever it holds
        print(f"error: {message}", file=sys.stderr)
        return EXIT_INVALID_INPUT
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM while validating: nothing was started
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
