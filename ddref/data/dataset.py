"""The bottom layer of :mod:`ddref.data`: the :class:`Dataset` every loader returns,
:class:`DataError`, the checks other modules share, and the normalisation with the
training split's statistics,

    x ← (x − μ_c) / σ_c,   μ_c, σ_c the mean and standard deviation of channel c over the
                           *training* pixels only (the test split never informs them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

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
# What a reader returns: pixels in [0, 1] in NCHW layout, int64 labels, the class names
# ---------------------------------------------------------------------------------------


class _Split(NamedTuple):
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: tuple


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
