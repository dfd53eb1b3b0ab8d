"""Which files each download-backed data set needs, and their checksums: every load reads
a file once, checks those bytes, and hands the very same bytes to the reader."""

from __future__ import annotations

import hashlib
import pathlib
from dataclasses import dataclass

from ddref.data.cache import _check_folder_usable, _check_not_a_folder, _dataset_dir, _kind
from ddref.data.dataset import DataError

# ---------------------------------------------------------------------------------------
# The published files
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RemoteFile:
    """One published file: its name on disk, its MD5 checksum, and where to fetch it."""

    filename: str
    md5: str
    urls: tuple  # tried in order; later ones are mirrors


_MNIST_MIRRORS = (
    # yann.lecun.com is the original home but now often refuses downloads (HTTP 403),
    # so the mirror torchvision uses is tried first.
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
_USPS_URL = "https://www.csie.ntu.edu.tw/~cjlin/libsvmtools/datasets/multiclass/"
_SVHN_URL = "http://ufldl.stanford.edu/housenumbers/"
_CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/"


def _mnist_file(filename: str, md5: str) -> RemoteFile:
    return RemoteFile(filename, md5, tuple(mirror + filename for mirror in _MNIST_MIRRORS))


# Checksums as published with torchvision's loaders (torchvision/datasets/*.py).
REMOTE_FILES = {
    "mnist": (
        _mnist_file("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
        _mnist_file("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
        _mnist_file("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
        _mnist_file("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c"),
    ),
    "usps": (
        RemoteFile("usps.bz2", "ec16c51db3855ca6c91edd34d0e9b197", (_USPS_URL + "usps.bz2",)),
        RemoteFile("usps.t.bz2", "8ea070ee2aca1ac39742fdd1ef5ed118", (_USPS_URL + "usps.t.bz2",)),
    ),
    "svhn": (
        RemoteFile(
            "train_32x32.mat", "e26dedcc434d2e4c54c9b2d4a06d8373", (_SVHN_URL + "train_32x32.mat",)
        ),
        RemoteFile(
            "test_32x32.mat", "eb5a983be6a315427106f1b164d9cef3", (_SVHN_URL + "test_32x32.mat",)
        ),
    ),
    "cifar10": (
        RemoteFile(
            "cifar-10-python.tar.gz",
            "c58f30108f718f92721af3b95e74349a",
            (_CIFAR10_URL + "cifar-10-python.tar.gz",),
        ),
    ),
}


# ---------------------------------------------------------------------------------------
# Checksums: every load hashes the very bytes it then parses
# ---------------------------------------------------------------------------------------
#
# No marker file vouches for a file: anyone who can plant a file in the cache can plant a
# marker beside it, and CIFAR-10 is a pickle, so skipping the checksum would let a planted
# archive run code.  Hashing costs about as much as reading the file (0.9 s to read and
# hash 170 MB on a busy 2-core machine), less than decompressing and parsing it.  The file
# is read once; the checksum is taken of those bytes and the readers parse those same
# bytes, so nothing can swap the file in between.


@dataclass(frozen=True)
class _Verified:
    """The bytes of one published file, read once and checked against its MD5 checksum."""

    path: pathlib.Path  # where they were read from, for messages
    content: bytes


def _md5_of(path: pathlib.Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _has_checksum(path: pathlib.Path, md5: str) -> bool:
    """Whether ``path`` is a readable file with checksum ``md5`` (never raises)."""
    try:
        return path.is_file() and _md5_of(path) == md5
    except OSError:
        return False


def _corrupt_file_error(name: str, path: pathlib.Path) -> DataError:
    return DataError(
        f"{path} does not match its published checksum (it is truncated or corrupt): "
        f"delete it and download it again with `ddref download {name}` "
        f"(or ddref.data.download({name!r}))."
    )


def _read_verified(name: str, remote: RemoteFile, path: pathlib.Path) -> _Verified:
    try:
        content = path.read_bytes()
    except OSError as error:
        raise DataError(
            f"cannot read {path} ({error.strerror or error}): make it readable, or delete it "
            f"and download it again with `ddref download {name}`."
        ) from None
    if hashlib.md5(content).hexdigest() != remote.md5:
        raise _corrupt_file_error(name, path)
    return _Verified(path, content)


def _verified_files(name: str, root=None) -> dict:
    """The files of ``name`` by file name, each read and checked against its checksum."""
    directory = _dataset_dir(name, root)
    _check_folder_usable(directory)
    remote_files = REMOTE_FILES[name]
    for remote in remote_files:
        _check_not_a_folder(name, directory / remote.filename)
    missing = [f.filename for f in remote_files if _kind(directory / f.filename) != "file"]
    if missing:
        raise DataError(
            f"{name} needs {', '.join(missing)} in {directory}: run `ddref download {name}` "
            f"(in Python: load({name!r}, download=True)), or place the "
            f"files there by hand (from {_sources(remote_files, missing)}) and ddref will "
            f"verify their checksums."
        )
    return {
        remote.filename: _read_verified(name, remote, directory / remote.filename)
        for remote in remote_files
    }


def _sources(remote_files, filenames) -> str:
    """The folders the named files are published in, e.g. ``https://host/mnist/``."""
    folders = [f.urls[0].rsplit("/", 1)[0] + "/" for f in remote_files if f.filename in filenames]
    return ", ".join(dict.fromkeys(folders))
