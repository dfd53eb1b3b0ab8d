"""Downloading a data set's published files into the cache, each checked before it is kept."""

from __future__ import annotations

import hashlib
import http.client
import os
import pathlib
import tempfile
import urllib.error
import urllib.request

from ddref.data.cache import _WRITABLE_FOLDER, _dataset_dir, _locate, _make_folder
from ddref.data.dataset import DataError
from ddref.data.verify import REMOTE_FILES, RemoteFile, _is_verified

# ---------------------------------------------------------------------------------------
# Downloading: stream to a temporary file beside the target, check, then rename
# ---------------------------------------------------------------------------------------

# Network failures: URLError, timeouts, resets and SSL errors are all OSErrors.  Failures to
# write the local file are turned into DataError before they can be mistaken for these.
_NETWORK_ERRORS = (OSError, http.client.HTTPException)
_DOWNLOAD_TIMEOUT_S = 60


def _download_missing(name: str, root=None) -> list:
    """Download the files of ``name`` that are absent or wrong; return all their paths.

    Where the cache lacks some and a package's folder holds them all, verified, those are
    used as they are and nothing is fetched.
    """
    remote_files = REMOTE_FILES.get(name, ())
    if not remote_files:
        return []
    directory, package = _locate(name, [f.filename for f in remote_files], root)
    if package is not None and all(_is_verified(f, directory / f.filename) for f in remote_files):
        return [directory / f.filename for f in remote_files]
    directory = _dataset_dir(name, root)
    paths = []
    for remote in remote_files:
        path = directory / remote.filename
        if not _is_verified(remote, path):
            _make_folder(directory)
            _fetch(name, remote, path)
        paths.append(path)
    return paths


def _fetch(name: str, remote: RemoteFile, path: pathlib.Path) -> None:
    """Download ``remote`` to ``path``, trying its URLs in turn."""
    failures = []
    for url in remote.urls:
        try:
            _download_verified(url, path, remote.md5)
            return
        except _NETWORK_ERRORS as error:
            failures.append(f"{url}: {getattr(error, 'reason', error)}")
    filenames = ", ".join(f.filename for f in REMOTE_FILES[name])
    raise DataError(
        f"could not download {remote.filename} ({'; '.join(failures)}); without a network "
        f"connection, place {filenames} in {path.parent} by hand and ddref will verify "
        f"their checksums."
    )


def _download_verified(url: str, path: pathlib.Path, md5: str) -> None:
    """Stream ``url`` into a temporary file beside ``path``; rename it only if ``md5`` matches."""
    try:
        descriptor, temporary = tempfile.mkstemp(
            dir=path.parent, prefix=f".{path.name}.", suffix=".part"
        )
    except OSError as error:
        raise DataError(
            f"cannot write in {path.parent} ({error.strerror or error}): {_WRITABLE_FOLDER}."
        ) from None
    try:
        with os.fdopen(descriptor, "wb") as stream:
            actual_md5 = _copy_response(url, stream, path)
        if actual_md5 != md5:
            raise DataError(
                f"the download of {path.name} from {url} has MD5 {actual_md5} instead of the "
                f"published {md5}; nothing was saved, so try again later or fetch the file by hand."
            )
        _put_in_place(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def _put_in_place(temporary: str, path: pathlib.Path) -> None:
    try:
        os.replace(temporary, path)
    except OSError as error:
        raise DataError(
            f"cannot save {path} ({error.strerror or error}): remove whatever is in its way, "
            f"or {_WRITABLE_FOLDER}."
        ) from None


def _copy_response(url: str, stream, path: pathlib.Path) -> str:
    """Copy the body at ``url`` into ``stream`` with a progress bar; return its MD5."""
    from tqdm import tqdm

    digest = hashlib.md5()
    with urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as response:
        length = response.headers.get("Content-Length")
        total = int(length) if length else None
        with tqdm(total=total, unit="B", unit_scale=True, desc=path.name, leave=False) as progress:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                _write(stream, chunk, path)
                digest.update(chunk)
                progress.update(len(chunk))
    return digest.hexdigest()


def _write(stream, chunk: bytes, path: pathlib.Path) -> None:
    """Write and flush one chunk, so that a local failure (a full disk) surfaces here, as a
    DataError, and not later as an OSError that would pass for a network failure."""
    try:
        stream.write(chunk)
        stream.flush()
    except OSError as error:
        raise DataError(
            f"cannot save {path} ({error.strerror or error}): free some disk space, or "
            f"{_WRITABLE_FOLDER}."
        ) from None
