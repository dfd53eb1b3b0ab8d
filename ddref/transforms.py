"""Bring one data set to another's image shape, once, at load time (adaptation, §3.6).

A network pre-trained on a *source* data set is adapted to a *target* data set, so it
must see source images in the target's shape (C, H, W).  :func:`to_shape` does that in
pixel space, then standardises the result with its own training statistics:

* **size** — each image is resampled so that the *digit box* of the source lands on the
  digit box of the target, centred.  MNIST's digits are scaled into a 20×20 box centred
  in the 28×28 frame (LeCun et al.); digits, USPS and SVHN fill their whole frame.  So
  ``digits`` 8×8 → ``mnist5k`` 28×28 scales by 20/8 and leaves a 4-pixel margin, and
  ``mnist`` 28×28 → ``usps`` 16×16 scales by 16/20 and crops MNIST's empty margin.
  Resampling is bilinear: a triangle filter, widened by the shrink factor when shrinking
  (so a downscaled image is averaged, not aliased); beyond the source's frame lies
  background, pixel value 0 (black: the background of every digit data set here).
* **channels** — grey → RGB repeats the grey channel; RGB → grey is the ITU-R BT.601
  luma 0.299 R + 0.587 G + 0.114 B.
* **normalisation** — every data set is standardised per channel with *its own* training
  split's mean and std (the source after resizing, the target as loaded), so a network
  sees zero-mean, unit-variance inputs on both.  The distilled images live in the
  target's normalised space, the one the networks are adapted to.

Both resampling and channel mixing are linear maps applied with one ``einsum``.
"""

from __future__ import annotations

import math

import numpy as np

from ddref import data

# bumped whenever what to_shape computes changes: pre-trained pools record it (and are retrained)
VERSION = 2

# the fraction of the frame a digit fills, per data set (the rest fill the whole frame)
DIGIT_BOX = {"mnist": 20 / 28, "mnist5k": 20 / 28}
LUMA = (0.299, 0.587, 0.114)


def box_fraction(name: str) -> float:
    return DIGIT_BOX.get(name, 1.0)


def scale_between(source: str, source_size: int, target: str, target_size: int) -> float:
    """Output pixels per source pixel, so the source's digit box fills the target's."""
    return (target_size * box_fraction(target)) / (source_size * box_fraction(source))


def resample_matrix(n_in: int, n_out: int, scale: float) -> np.ndarray:
    """The (n_out, n_in) bilinear resampling matrix along one axis: source pixel j is
    spread by ``scale`` and centred in the output.  Output pixel i samples the source at
    u = (i + ½ − offset) / scale − ½ with a triangle filter of half-width max(1, 1/scale);
    weights are normalised over the whole filter, and those falling outside the source are
    dropped (background 0), so rows sum to 1 inside the frame and fade to 0 beyond it."""
    offset = (n_out - n_in * scale) / 2
    support = max(1.0, 1.0 / scale)
    matrix = np.zeros((n_out, n_in))
    for i in range(n_out):
        u = (i + 0.5 - offset) / scale - 0.5
        taps = range(math.floor(u - support), math.ceil(u + support) + 1)
        weights = [max(0.0, 1.0 - abs(u - j) / support) for j in taps]
        total = sum(weights)
        for j, weight in zip(taps, weights):
            if 0 <= j < n_in:
                matrix[i, j] += weight / total
    return matrix


def channel_matrix(c_in: int, c_out: int) -> np.ndarray:
    """The (c_out, c_in) channel map: identity, grey → RGB, or RGB → grey (luma)."""
    if c_in == c_out:
        return np.eye(c_in)
    if c_in == 1:
        return np.ones((c_out, 1))
    if c_in == 3 and c_out == 1:
        return np.asarray([LUMA])
    raise ValueError(f"cannot map {c_in}-channel images to {c_out} channels; adapt between "
                     f"grey (1) and RGB (3) images only.")


def transform_pixels(pixels, source: str, target: str, target_shape) -> np.ndarray:
    """Pixel images (N, C, H, W) of data set ``source`` in the shape ``target_shape`` (C, H, W)
    of data set ``target``, by the documented resampling and channel map."""
    _, c, h, w = pixels.shape
    c_out, h_out, w_out = target_shape
    rows = resample_matrix(h, h_out, scale_between(source, h, target, h_out))
    cols = resample_matrix(w, w_out, scale_between(source, w, target, w_out))
    mix = channel_matrix(c, c_out)
    out = np.einsum("dc,ih,nchw,jw->ndij", mix, rows, pixels, cols, optimize=True)
    return out.astype(pixels.dtype)


def describe(source: str, source_shape, target: str, target_shape) -> str:
    """One line saying what :func:`to_shape` does to ``source`` for ``target``."""
    if tuple(source_shape) == tuple(target_shape) and box_fraction(source) == box_fraction(target):
        return f"{source} as loaded (same shape as {target}); standardised with its own training statistics"
    (c, h, w), (c_out, h_out, w_out) = source_shape, target_shape
    scale = scale_between(source, h, target, h_out)
    channels = "" if c == c_out else (", grey repeated into RGB" if c == 1 else ", RGB to grey luma")
    return (f"{source} {c}×{h}×{w} → {c_out}×{h_out}×{w_out}: bilinear ×{scale:.3g}, centred "
            f"(digit box {h * box_fraction(source):.3g} → {h_out * box_fraction(target):.3g} px), "
            f"background 0 beyond the frame{channels}; standardised with its own training statistics")


def to_shape(dataset: data.Dataset, target: str, target_shape) -> data.Dataset:
    """``dataset`` with its images brought to ``target_shape`` (C, H, W) of data set ``target``
    and standardised again with the new training split's per-channel mean and std."""
    if dataset.image_shape == tuple(target_shape) and box_fraction(dataset.name) == box_fraction(target):
        return dataset
    train = transform_pixels(data.denormalise(dataset.x_train, dataset.mean, dataset.std),
                             dataset.name, target, target_shape)
    test = transform_pixels(data.denormalise(dataset.x_test, dataset.mean, dataset.std),
                            dataset.name, target, target_shape)
    mean = np.array([train[:, c].mean(dtype=np.float64) for c in range(train.shape[1])])
    std = np.array([train[:, c].std(dtype=np.float64) for c in range(train.shape[1])])
    channel = (-1, 1, 1)
    dtype = dataset.x_train.dtype
    return data.Dataset(
        name=dataset.name,
        x_train=((train - mean.reshape(channel)) / std.reshape(channel)).astype(dtype),
        y_train=dataset.y_train,
        x_test=((test - mean.reshape(channel)) / std.reshape(channel)).astype(dtype),
        y_test=dataset.y_test,
        mean=mean.astype(dtype), std=std.astype(dtype), classes=dataset.classes)
