"""CIFAR-10's python-version archive, read by an unpickler that admits only the arrays,
lists, strings and numbers of the format, so even an archive with the right checksum
cannot run code."""

from __future__ import annotations

import io
import pathlib
import pickle
import struct
import tarfile
import zlib

import numpy as np

from ddref.data.dataset import _Split
from ddref.data.formats import _unit_pixels, _unreadable
from ddref.data.verify import _Verified

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
