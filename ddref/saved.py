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
"""

from __future__ import annotations

import errno
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import ddref


class SavedFileError(RuntimeError):
    """A file on disk (a distilled set, a checkpoint, metrics) cannot be used as it is."""


# ---------------------------------------------------------------------------- files


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


# ---------------------------------------------------------------------------- the distilled set

DISTILLED_KEYS = ("images", "labels", "lrs", "mean", "std", "config", "version")


@dataclass
class DistilledSet:
    """What a run produces: images (S, n, C, H, W) in normalised space, their labels (n,),
    the learned learning rates (E, S), θ0 for fixed init, and the data normalisation; with
    learned labels (``--learn-labels``) also the label distributions (S, n, K) that training
    on the set uses instead of the one-hot ``labels`` (the class each image started from)."""

    images: np.ndarray
    labels: np.ndarray
    lrs: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    config: dict
    theta0: dict | None = None
    version: str = ddref.__version__
    classes: tuple | None = None     # class names, so figures need not load the data set
    soft_labels: np.ndarray | None = None   # learned label distributions (S, n, K), ddref.labels

    def save(self, path):
        arrays = {"images": self.images, "labels": self.labels, "lrs": self.lrs,
                  "mean": self.mean, "std": self.std,
                  "config": np.array(json.dumps(self.config)), "version": np.array(self.version)}
        if self.classes is not None:
            arrays["classes"] = np.array([str(c) for c in self.classes])
        if self.soft_labels is not None:
            arrays["soft_labels"] = self.soft_labels
        for k, v in (self.theta0 or {}).items():
            arrays[f"theta0/{k}"] = np.asarray(v)
        atomic_savez(path, arrays)

    @classmethod
    def load(cls, path, num_classes=None):
        """Read and check a saved set.  ``num_classes`` (when known) bounds the labels."""
        path = Path(path)
        arrays = load_npz(path, "distilled set")
        missing = [k for k in DISTILLED_KEYS if k not in arrays]
        if missing:
            raise SavedFileError(f"{path} is not a distilled set: it lacks {', '.join(missing)}; "
                                 f"make one with `ddref distill`.")
        config = json_field(arrays, "config", path, "distilled set")
        if not isinstance(config, dict):
            raise SavedFileError(f"{path} is not a usable distilled set: its config is not a "
                                 f"JSON object; make it again with `ddref distill`.")
        theta0 = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("theta0/")}
        classes = tuple(str(c) for c in arrays["classes"]) if "classes" in arrays else None
        distilled = cls(images=arrays["images"], labels=arrays["labels"], lrs=arrays["lrs"],
                        mean=arrays["mean"], std=arrays["std"], config=config,
                        theta0=theta0 or None, version=str(arrays["version"]), classes=classes,
                        soft_labels=arrays.get("soft_labels"))
        distilled.check(num_classes, source=path)
        return distilled

    def check(self, num_classes=None, source="distilled set"):
        """One sentence for anything that would make training on this set meaningless."""
        def fail(problem):
            raise SavedFileError(f"{source}: {problem}; it cannot be used — make it again with "
                                 f"`ddref distill`.")

        for name in ("images", "lrs", "mean", "std"):
            if getattr(self, name).dtype.kind != "f":
                fail(f"its {name} are {getattr(self, name).dtype}, not floating-point numbers")
        if self.images.ndim != 5 or self.lrs.ndim != 2 or self.lrs.shape[1] != self.images.shape[0]:
            fail(f"it has images {self.images.shape} and lrs {self.lrs.shape}, where images "
                 f"(steps, n, C, H, W) and lrs (epochs, steps) are needed")
        n, channels = self.images.shape[1], self.images.shape[2]
        if self.labels.shape != (n,) or self.labels.dtype.kind not in "iu":
            fail(f"it has {n} images per step but labels of shape {self.labels.shape} and type "
                 f"{self.labels.dtype}")
        if n and (self.labels.min() < 0 or (num_classes is not None and self.labels.max() >= num_classes)):
            bound = f"0..{num_classes - 1}" if num_classes is not None else "0 or above"
            fail(f"its labels run {self.labels.min()}..{self.labels.max()}, outside {bound}")
        if self.mean.shape != (channels,) or self.std.shape != (channels,) or not (self.std > 0).all():
            fail(f"its normalisation (mean {self.mean.shape}, std {self.std.shape}) does not fit "
                 f"{channels}-channel images with positive std")
        for name, array in (("images", self.images), ("learning rates", self.lrs),
                            ("normalisation", np.concatenate([self.mean, self.std]))):
            if not np.isfinite(array).all():
                fail(f"its {name} contain NaN or inf")
        if self.soft_labels is not None:
            from ddref.labels import check_soft_labels

            problem = check_soft_labels(self.soft_labels, *self.images.shape[:2], num_classes,
                                        self.config.get("label_form", "softmax"))
            if problem:
                fail(problem)
        if not (self.lrs > 0).all():
            fail(f"its learning rates include {self.lrs.min():.3g}, and a learned learning rate "
                 f"is always positive")
        for key, value in (self.theta0 or {}).items():
            if value.dtype.kind != "f" or not np.isfinite(value).all():
                fail(f"its θ0 entry {key!r} is not a finite floating-point array")
        return self

    def check_theta0(self, shapes, source="distilled set"):
        """θ0, when saved, must have exactly the model's parameters with the model's shapes."""
        if self.theta0 is None:
            return self
        got = {k: tuple(v.shape) for k, v in self.theta0.items()}
        want = {k: tuple(v) for k, v in shapes.items()}
        if got != want:
            missing = sorted(set(want) - set(got))
            wrong = sorted(k for k in set(want) & set(got) if got[k] != want[k])
            extra = sorted(set(got) - set(want))
            detail = "; ".join(part for part in (
                f"missing {', '.join(missing)}" if missing else "",
                f"mis-shaped {', '.join(f'{k} {got[k]} (want {want[k]})' for k in wrong)}" if wrong else "",
                f"unknown {', '.join(extra)}" if extra else "") if part)
            raise SavedFileError(f"{source}: its θ0 does not fit the model ({detail}); it cannot "
                                 f"be used — make it again with `ddref distill`.")
        return self


# ---------------------------------------------------------------------------- the run folder

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
        self.out, self.fd, self.created = Path(out), fd, created

    def release(self):
        if self.fd is None:
            return
        try:
            (self.out / LOCK_FILE).unlink(missing_ok=True)
            if self.created and not any(self.out.iterdir()):
                self.out.rmdir()         # a run that never started leaves no empty folder
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
    created = not out.exists()
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
