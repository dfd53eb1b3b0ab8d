"""The run folder (``--out``): checked before anything is computed, held by one run at a time.

:func:`check_run_folder` decides whether ``--out`` may be written, so that a finished run is
never overwritten unasked; :func:`claim_run_folder` clears an old run being replaced; and
:func:`lock_run_folder` holds the folder for one run at a time (an exclusive ``flock`` on
``OUT/.lock``, which the kernel drops when the process ends, however it ends).
"""

from __future__ import annotations

import os
from pathlib import Path

from ddref.saved.files import SavedFileError


RUN_FILES = ("distilled.npz", "distilled.png", "curves.png", "metrics.json", "checkpoint.npz",
             "pools.json", "labels.png")
LOCK_FILE = ".lock"


def _is_run_file(name):
    return name in RUN_FILES or (name.endswith(".tmp") and name[:-4] in RUN_FILES)


class RunFolderLock:
    """An exclusive lock on a run folder, held from :func:`lock_run_folder` until
    :meth:`release` (or the end of the process: the kernel releases a ``flock`` when its
    holder dies, so a killed run never blocks the next one)."""

    def __init__(self, out, fd, created):
        self.out, self.fd = Path(out), fd
        self.created = created                   # the folders the lock made, deepest first

    def release(self):
        if self.fd is None:
            return
        try:
            (self.out / LOCK_FILE).unlink(missing_ok=True)
            for folder in self.created:  # a run that never started leaves no empty folders
                if any(folder.iterdir()):
                    break
                folder.rmdir()
        except OSError:
            pass
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def lock_run_folder(out):
    """Create ``out`` if needed and take its lock, or say in one sentence which process holds
    it.  A second ``ddref distill`` on the same --out, or a ``--resume`` of a run still going,
    is refused here, before anything is read or computed."""
    out = Path(out)
    for parent in [out, *out.parents]:
        if parent.exists() and not parent.is_dir():
            raise SavedFileError(f"--out {out}: {parent} is a file, not a folder; choose another --out.")
    created = [folder for folder in [out, *out.parents] if not folder.exists()]
    path = out / LOCK_FILE
    try:
        out.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            if not _try_flock(fd):
                holder = _lock_holder(fd)
                os.close(fd)
                raise SavedFileError(
                    f"--out {out} is in use by another ddref run ({holder}); wait for it to end "
                    f"or stop it, or choose another --out.")
            try:                 # a run that just ended may have unlinked the file we locked
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    except OSError as error:
        raise SavedFileError(f"--out {out} cannot be written ({error.strerror or error}); "
                             f"choose a folder you can write to.") from None
    return RunFolderLock(out, fd, created)


def _try_flock(fd):
    try:
        import fcntl
    except ImportError:          # no flock on this platform: one run at a time is up to the user
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _lock_holder(fd):
    try:
        pid = os.pread(fd, 32, 0).decode().strip()
    except (OSError, UnicodeDecodeError):
        pid = ""
    return f"process {pid}" if pid.isdigit() else "a process that is still starting"


def check_run_folder(out, resume=False, force=False):
    """Decide, before any computation, whether ``--out`` may be used; returns the run files
    that a ``force`` replacement will delete (see :func:`claim_run_folder`).

    A new or empty folder is used as it is; a folder holding a run is continued only with
    ``resume`` and replaced only with ``force``; anything else — a file, a path below a file,
    a folder that is not a ddref run, a folder that cannot be written — is refused with one
    sentence.  Nothing is created or deleted here.
    """
    out = Path(out)
    if resume and force:
        raise SavedFileError("--resume continues a run and --force replaces it: give only one.")
    for parent in [out, *out.parents]:
        if parent.exists() and not parent.is_dir():
            raise SavedFileError(f"--out {out}: {parent} is a file, not a folder; choose another --out.")
    if resume:
        if not (out / "checkpoint.npz").is_file():
            raise SavedFileError(f"--resume: there is no checkpoint in {out}; start a new run "
                                 f"without --resume (or check --out).")
        _check_writable(out)
        return []
    entries = sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE) if out.is_dir() else []
    present = [name for name in entries if _is_run_file(name)]
    others = [name for name in entries if not _is_run_file(name)]
    if present and not force:
        state = "a finished run" if (out / "metrics.json").exists() else "an unfinished run"
        raise SavedFileError(
            f"--out {out} already holds {state}; continue it with --resume, replace it with "
            f"--force, or choose another --out.")
    if others and not present:
        raise SavedFileError(f"--out {out} is a folder that is not a ddref run (it holds "
                             f"{', '.join(others[:3])}{', …' if len(others) > 3 else ''}); "
                             f"choose a new or empty folder.")
    _check_writable(out)
    return present


def claim_run_folder(out, replace=()):
    """Create ``out`` and delete the old run files ``replace`` (from :func:`check_run_folder`
    with ``force``) so that an interrupted replacement never leaves a folder mixing two runs."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name in replace:
            (out / name).unlink(missing_ok=True)
    except OSError as error:
        raise SavedFileError(f"--out {out} cannot be written ({error.strerror or error}); "
                             f"choose a folder you can write to.") from None
    return out


def _check_writable(out):
    """``out`` (or the nearest folder above it that exists) must be writable."""
    existing = next(p for p in [out, *out.parents] if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SavedFileError(f"--out {out} cannot be written ({existing} is not writable); "
                             f"choose a folder you can write to.")
