"""The ``ddref`` command line: ``distill``, ``evaluate``, ``show``, ``train``, ``pretrain``, ``datasets``.

    ddref distill                       # digits, mlp, fixed init, 10 steps × 3 epochs
    ddref distill --init random --n-nets 4 --out runs/random
    ddref distill --resume --out runs/random
    ddref evaluate runs/digits-mlp-fixed
    ddref show runs/digits-mlp-fixed
    ddref train --dataset mnist5k --model lenet
    ddref pretrain --dataset digits --target mnist5k --model lenet --nets 20
    ddref pretrain --list
    ddref distill --init random-pretrained --source-dataset digits --dataset mnist5k --model lenet
    ddref datasets
    ddref download mnist
    ddref table --grid small --jobs 2   # distilled vs the baselines, one run folder per cell
"""

from __future__ import annotations

import os
import sys

from ddref import data
from ddref.cli.options import build_parser
from ddref.cli.run import cmd_distill
from ddref.cli.judge import cmd_evaluate
from ddref.cli.tools import cmd_datasets, cmd_download, cmd_pretrain, cmd_show, cmd_table, cmd_train


COMMANDS = {"distill": cmd_distill, "evaluate": cmd_evaluate, "show": cmd_show,
            "train": cmd_train, "datasets": cmd_datasets, "pretrain": cmd_pretrain,
            "download": cmd_download, "table": cmd_table}


def _no_progress_bar_into_a_file(args):
    """A progress bar is for a terminal: redirected into a log it is thousands of redrawn
    lines, so a command whose stderr is not a terminal runs as with --no-progress."""
    if hasattr(args, "no_progress") and not sys.stderr.isatty():
        args.no_progress = True


def main(argv=None):
    try:
        from ddref import backend  # noqa: F401  (selects DDREF_BACKEND, which may fail)
        from ddref.distill import DistillError
        from ddref.nn import ShapeError
        from ddref.saved import SavedFileError

        errors = (data.DataError, DistillError, SavedFileError, ShapeError, ValueError,
                  backend.BackendUnavailable, OSError)
    except (ValueError, ImportError, RuntimeError) as error:
        print(f"ddref: error: {error} (from DDREF_BACKEND={os.environ.get('DDREF_BACKEND')!r})"
              if "backend" in str(error).lower() else f"ddref: error: {error}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    _no_progress_bar_into_a_file(args)
    try:
        if args.threads:
            from threadpoolctl import threadpool_limits

            with threadpool_limits(limits=args.threads, user_api="blas"):
                return COMMANDS[args.command](args)
        return COMMANDS[args.command](args)
    except errors as error:
        print(f"ddref: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ddref: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
