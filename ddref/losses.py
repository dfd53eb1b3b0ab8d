"""Softmax cross-entropy (hard labels or label distributions), accuracy, and the
poisoning objective of §3.5 (make class K be read as class T)."""

from __future__ import annotations

import numbers

import autograd.numpy as anp
import numpy as np
from autograd.tracer import getval

from ddref import backend


def log_softmax(logits):
    """log softmax along the class axis: logits − log Σ exp(logits), computed stably by
    subtracting the row max m first.  The result does not depend on m, so m is held constant
    (``getval``): derivatives of every order are exact and nothing is traced through the max.
    (Written with autograd.numpy rather than scipy's logsumexp, which converts its input to a
    host array and so cannot run on CuPy arrays.)"""
    shifted = logits - anp.max(getval(logits), axis=1, keepdims=True)
    return shifted - anp.log(anp.sum(anp.exp(shifted), axis=1, keepdims=True))


def class_labels(labels, num_classes, name="labels"):
    """``labels`` checked as one whole class number in 0 … num_classes − 1 per image, shape
    (N,), as integers on the selected backend; anything else is one ValueError naming ``name``."""
    xp = backend.xp()
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
        raise ValueError(f"num_classes must be a whole number of at least 1, got {num_classes!r}.")
    labels = backend.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"{name} must be one integer per image, shape (N,); got shape "
                         f"{tuple(labels.shape)}.")
    if labels.dtype.kind not in "iu":
        if labels.dtype.kind != "f" or not bool((labels == xp.floor(labels)).all()):
            raise ValueError(f"{name} must be whole class numbers; got {labels.dtype} values "
                             f"such as {_first_fraction(labels)}: round them or use learned labels.")
        labels = labels.astype(int)
    if labels.size and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"{name} must lie in 0..{num_classes - 1} for {num_classes} classes; "
                         f"got {int(labels.min())}..{int(labels.max())}: check num_classes or the labels.")
    return labels


def one_hot(labels, num_classes, dtype="float64"):
    """Integer labels (N,) → one-hot rows (N, num_classes) on the selected backend.
    A label outside 0..num_classes−1 is a ValueError (it would be an all-zero row)."""
    labels = class_labels(labels, num_classes)
    return (labels[:, None] == backend.xp().arange(num_classes)[None, :]).astype(dtype)


def _first_fraction(labels):
    values = backend.to_numpy(labels).ravel()
    odd = values[values != values.astype(int)] if values.dtype.kind == "f" else values
    return odd[0] if odd.size else values[:1]


def cross_entropy(logits, targets):
    """Mean cross-entropy of ``logits`` (N, K) against ``targets``: either label
    distributions (N, K) — soft labels — or one-hot rows (use :func:`one_hot` for integer
    labels; a dense target keeps the gradient free of scatter operations)."""
    # sum / N rather than mean: autograd's rule for mean divides by an int64 count, which
    # numpy 2 promotes to float64 and would silently turn float32 gradients into float64
    if logits.shape[0] == 0 or tuple(targets.shape) != tuple(logits.shape):
        raise ValueError(f"cross_entropy needs logits (N, K) with N ≥ 1 and targets of the same "
                         f"shape; got logits {tuple(logits.shape)} and targets {tuple(targets.shape)}.")
    return -anp.sum(targets * log_softmax(logits)) / logits.shape[0]


def squared_error(outputs, targets):
    """½ · mean over rows of ‖output − target‖²: the quadratic loss of linear regression,
    ℓ(θ) = 1/(2N) ‖dθ − t‖² (§3.4)."""
    return 0.5 * anp.sum((outputs - targets) ** 2) / outputs.shape[0]  # sum / N keeps float32


def accuracy(logits, labels) -> float:
    """Fraction of rows whose arg-max equals the integer label."""
    logits, labels = backend.to_numpy(logits), backend.to_numpy(labels)
    if logits.ndim != 2 or len(logits) == 0 or np.shape(labels) != (len(logits),):
        raise ValueError(f"accuracy needs logits (N, K) with N ≥ 1 and N labels; got logits "
                         f"{logits.shape} and labels {np.shape(labels)}.")
    return float((logits.argmax(axis=1) == labels).mean())


def attack_targets(labels, num_classes, source_class, target_class, dtype="float64"):
    """One-hot targets for the poisoning objective: every image of ``source_class`` (K) is
    labelled ``target_class`` (T), every other image keeps its own label.  Minimising the
    cross-entropy against these targets makes the trained network read K as T while
    leaving the other classes alone."""
    for name, value in (("source_class", source_class), ("target_class", target_class)):
        if not isinstance(value, numbers.Integral) or not 0 <= value < num_classes:
            raise ValueError(f"{name}={value} is not a class index in 0..{num_classes - 1}.")
    if source_class == target_class:
        raise ValueError("source_class and target_class must differ for an attack.")
    labels = backend.to_numpy(labels).copy()
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1}; got {labels.min()}..{labels.max()}.")
    labels[labels == source_class] = target_class
    return one_hot(labels, num_classes, dtype)
