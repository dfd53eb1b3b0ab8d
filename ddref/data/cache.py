"""Where data files live: the cache folder (``$DDREF_DATA``), and the checks that turn a
folder that cannot be used into one sentence naming the fix."""

from __future__ import annotations

import os
import pathlib
import stat
from dataclasses import dataclass

from ddref.data.dataset import DataError

_WRITABLE_FOLDER = "point $DDREF_DATA at a folder you can write to"


# ---------------------------------------------------------------------------------------
# The cache folder
# ---------------------------------------------------------------------------------------


def cache_dir(root=None) -> pathlib.Path:
    """Where downloaded data lives: ``root``, else ``$DDREF_DATA``, else ``~/.cache/ddref``."""
    if root is None:
        root = os.environ.get("DDREF_DATA") or pathlib.Path.home() / ".cache" / "ddref"
    return pathlib.Path(root).expanduser()


def _dataset_dir(name: str, root=None) -> pathlib.Path:
    return cache_dir(root) / name

# ---------------------------------------------------------------------------------------
# Folders a distribution's package fills, searched after the cache
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SystemFolder:
    """A read-only folder where a package of the operating system installs a data set."""

    path: pathlib.Path
    package: str  # e.g. the Debian package that installs it


SYSTEM_FOLDERS = {
    "fashion-mnist": (
        SystemFolder(pathlib.Path("/usr/share/datasets/fashion-mnist"), "dataset-fashion-mnist"),
    ),
}


def _locate(name: str, filenames, root=None):
    """The folder to read the files of ``name`` from, and its :class:`SystemFolder` (or None).

    The cache folder ``cache_dir(root)/<name>`` wins if it holds every file; else the first
    package folder that does; else the cache folder again, so that the missing files are
    named there.  A cache folder that cannot be used is an error even then.
    """
    directory = _dataset_dir(name, root)
    _check_folder_usable(directory)
    for filename in filenames:
        _check_not_a_folder(name, directory / filename)
    if not _holds_all(directory, filenames):
        for folder in SYSTEM_FOLDERS.get(name, ()):
            if _holds_all(folder.path, filenames):
                return folder.path, folder
    return directory, None


def _holds_all(directory: pathlib.Path, filenames) -> bool:
    try:
        return all(_kind(directory / filename) == "file" for filename in filenames)
    except DataError:
        return False


# ---------------------------------------------------------------------------------------
# Checks that name the fix
# ---------------------------------------------------------------------------------------


def _kind(path: pathlib.Path) -> str:
    """'file', 'folder', 'missing' or 'other' — or a DataError if ``path`` cannot be looked at."""
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        return "missing"  # a dangling link counts as missing too
    except OSError as error:
        raise DataError(
            f"cannot look at {path} ({error.strerror or error}): make its folder readable, "
            f"or point $DDREF_DATA at a folder you can read and write."
        ) from None
    return "file" if stat.S_ISREG(mode) else "folder" if stat.S_ISDIR(mode) else "other"


def _check_folder_usable(directory: pathlib.Path) -> None:
    """Refuse a data folder that is, or lies below, a file (e.g. ``$DDREF_DATA`` names a file)."""
    for folder in reversed((directory, *directory.parents)):
        if _kind(folder) in ("file", "other"):
            raise DataError(
                f"{folder} is a file, not a folder, so ddref cannot keep data sets in "
                f"{directory}: point $DDREF_DATA at a folder (or move the file away)."
            )


def _check_not_a_folder(name: str, path: pathlib.Path) -> None:
    if _kind(path) == "folder":
        raise DataError(
            f"{path} is a folder where ddref expects the file {path.name}: remove the folder, "
            f"then run `ddref download {name}`."
        )


def _make_folder(directory: pathlib.Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataError(
            f"cannot create the folder {directory} ({error.strerror or error}): "
            f"{_WRITABLE_FOLDER}."
        ) from None
