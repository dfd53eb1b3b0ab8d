"""What a run leaves on disk, written atomically and checked when read back.

* :class:`DistilledSet` — the distilled images, their labels, the learned learning rates,
  θ0 for fixed init, the normalisation and the config (``distilled.npz``).
* checkpoints — the full state of Algorithm 1 between two outer iterations
  (``checkpoint.npz``), see :meth:`ddref.distill.Distiller.save_checkpoint`.
* the run folder — :func:`check_run_folder` decides, before anything is computed, whether
  ``--out`` may be written, so that a finished run is never overwritten unasked, and
  :func:`lock_run_folder` holds it for one run at a time (an exclusive ``flock`` on
  ``OUT/.lock``, which the kernel drops when the process ends, however it ends).

Every file is written to a temporary name and renamed into place, so a crash or Ctrl-C never
leaves half a file; every file is read with ``allow_pickle=False`` and checked before use, and
a bad one gets one sentence naming the file and the fix.

The package in layers, each module importing only those above it in this list:

    files       SavedFileError, write_atomically and the checked readers every file uses
    distilled   DistilledSet, the ``distilled.npz`` format
    run_folder  check_run_folder, claim_run_folder, lock_run_folder
"""

from __future__ import annotations

from ddref.saved.files import (  # noqa: F401
    SavedFileError, atomic_savez, atomic_write_text, check_folder_writable, json_field, json_safe,
    load_npz, read_json, write_atomically, write_error,
)
from ddref.saved.distilled import DISTILLED_KEYS, DistilledSet  # noqa: F401
from ddref.saved.run_folder import (  # noqa: F401
    LOCK_FILE, RUN_FILES, RunFolderLock, check_run_folder, claim_run_folder, lock_run_folder,
)
