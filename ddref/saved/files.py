"""Files written atomically and read back checked: the helpers every saved file uses.

Every file is written to a temporary name and renamed into place (:func:`write_atomically`),
so a crash or Ctrl-C never leaves half a file; a failing disk or folder is one
:class:`SavedFileError` sentence naming the path and the fix.  Every ``.npz`` is read with
``allow_pickle=False`` (:func:`load_npz`), and JSON is written as standard JSON
(:func:`json_safe`) and read back with its keys checked (:func:`read_json`).
"""

from __future__ import annotations

import errno
import json
import math
import os
from pathlib import Path

import numpy as np


class SavedFileError(RuntimeError):
    """A file on disk (a distilled set, a checkpoint, metrics) cannot be used as it is."""


def write_atomically(path, write, mode="wb"):
    """Write ``path`` through ``write(stream)`` into ``PATH.tmp``, then rename it into place,
    so that a crash never leaves half a file.  Any failure of the disk or the folder (full,
    read-only, not a folder, no permission) is one :class:`SavedFileError` sentence naming
    the path, and the temporary file is removed."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    except OSError as error:
        _remove(tmp)
        raise write_error(path, error) from None
    except BaseException:     # Ctrl-C or a failing writer: never a .tmp left behind either
        _remove(tmp)
        raise


def _remove(path):
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def write_error(path, error):
    """One sentence for an OSError met writing ``path``, with the fix."""
    fix = {errno.ENOSPC: "free some disk space (or choose a folder on another disk) and run "
                         "the command again",
           errno.EDQUOT: "free some of your disk quota and run the command again",
           errno.EROFS: "the disk is read-only: choose a folder on a writable disk"}.get(
        error.errno, "make the folder writable or choose another one, and run the command again")
    return SavedFileError(f"could not write {path} ({error.strerror or error}); {fix}.")


def atomic_savez(path, arrays):
    """Write an .npz file so that a crash never leaves a half-written file behind."""
    write_atomically(path, lambda f: np.savez(f, **arrays))


def atomic_write_text(path, text):
    """Write a text file atomically (temporary file, then rename)."""
    write_atomically(path, lambda f: f.write(text), mode="w")


def check_folder_writable(folder, what, fix="make it writable, or set DDREF_DATA to a folder you "
                                            "can write to, before anything is trained"):
    """Create ``folder`` if needed and write (then remove) a small file in it, so that a folder
    that cannot take a file is found before anything is computed for it."""
    import tempfile

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".ddref-write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise SavedFileError(f"{what} {folder} cannot be written ({error.strerror or error}); "
                             f"{fix}.") from None


def load_npz(path, what):
    """All arrays of an .npz file as a dict, or one sentence saying why it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise SavedFileError(f"no {what} at {path}; check the path.")
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except Exception as error:  # zipfile/format/pickle errors all mean the same to the user
        raise SavedFileError(f"{path} is not a readable {what} ({error.__class__.__name__}); "
                             f"it may be truncated or corrupt: delete it and run again.") from None


def json_field(arrays, key, path, what):
    """Decode the JSON string stored under ``key`` of a loaded .npz."""
    try:
        return json.loads(str(arrays[key]))
    except (KeyError, ValueError) as error:
        raise SavedFileError(f"{path} is not a usable {what}: its {key!r} entry is missing or not "
                             f"valid JSON ({error.__class__.__name__}); make it again.") from None


def read_json(path, what, required=()):
    """A JSON object from ``path`` that has every key in ``required``, else one sentence."""
    path = Path(path)
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SavedFileError(f"no {what} at {path}; is it a finished `ddref distill` run?") from None
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise SavedFileError(f"{path} is not a readable {what} ({error.__class__.__name__}: "
                             f"{error}); re-create it with `ddref distill` or delete it.") from None
    missing = [k for k in required if not isinstance(values, dict) or k not in values]
    if missing:
        raise SavedFileError(f"{path} is not a complete {what}: it lacks {', '.join(missing)}; "
                             f"re-create it with `ddref distill`.")
    return values


def json_safe(value):
    """``value`` with every non-finite float replaced by None, so ``json.dumps`` writes
    standard JSON (a bare NaN is not JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
