"""Learned labels, and fewer distilled images than classes.

The paper fixes the label of every distilled image.  Sucholutsky & Schonlau ("Soft-label
dataset distillation", 2021) learn them too: each image x̃[s, i] gets a label vector
z[s, i] ∈ R^K, learned jointly with x̃ and η̃ by the same outer Adam steps, and its training
target t is made from z in one of two forms (``--label-form``):

* ``softmax`` — t = softmax(z), a label *distribution*: "a 3 that also looks like an 8";
* ``free`` — t = z itself, any real vector, as in Sucholutsky & Schonlau's code.  The
  cross-entropy −Σ_k t_k log p_k is linear in t, and its gradient in the logits is
  p · Σ_k t_k − t: the sum of a free label scales how hard its image pushes (a per-image
  learning rate) and a negative entry pushes the network *away* from a class — targets
  "harder than hard", which no distribution can be.

The meta-gradient engines of :mod:`ddref.hypergrad` return ∂L/∂t (the inner targets are one
more input of every step); for the softmax form the chain rule gives

    ∂L/∂z = t ⊙ (∂L/∂t − ⟨t, ∂L/∂t⟩)          (row by row)

and for the free form ∂L/∂z = ∂L/∂t.  A learned label can teach several classes with one
image — which is what lets *fewer images than classes* work at all.

* :func:`assigned_labels` — the class each image starts from: N images for K classes,
  round-robin (image j gets class j mod K), listed class-major.  N = K·m gives the paper's
  m images per class.
* :func:`initial_logits` — softmax form: z[s, i] = c · onehot(label i) with
  c = log(p (K − 1) / (1 − p)), so every target starts at p (``--label-init``, default 0.9)
  on its assigned class and (1 − p) / (K − 1) on each other class; free form: z = onehot,
  the hard label itself.
* :func:`soft_targets`, :func:`logits_gradient` — t from z, and ∂L/∂z from ∂L/∂t.
"""

from __future__ import annotations

import math

import numpy as np

from ddref import backend
from ddref.losses import log_softmax, one_hot

INITIAL_CONFIDENCE = 0.9     # softmax of the initial logits on the assigned class
LABEL_FORMS = ("softmax", "free")


def assigned_labels(num_classes, n_images):
    """The class of each of ``n_images`` images per step: image j gets class j mod K, listed
    class-major ([0, 0, 1, 1, 2, …]); every class appears ⌊N/K⌋ or ⌈N/K⌉ times, the first
    N mod K classes once more (for N < K: only classes 0 … N−1)."""
    if n_images < 1 or num_classes < 1:
        raise ValueError(f"need at least one image and one class; got {n_images} images for "
                         f"{num_classes} classes.")
    return np.sort(np.arange(n_images) % num_classes)


def initial_logits(labels, num_classes, steps, dtype="float32", confidence=INITIAL_CONFIDENCE,
                   form="softmax"):
    """(S, n, K) label vectors z = c · onehot(label) for every step.  Softmax form:
    c = log(p (K − 1) / (1 − p)), so that softmax puts p = ``confidence`` on the assigned
    class and (1 − p)/(K − 1) on each other class (for K = 1 there is nothing to learn:
    c = 0).  Free form: c = 1, the hard label (``confidence`` is not used)."""
    _check_form(form)
    if form == "free":
        scale = 1.0
    else:
        if not (isinstance(confidence, (int, float)) and 0 < confidence < 1):
            raise ValueError(f"confidence (--label-init) must lie strictly between 0 and 1, the "
                             f"starting probability of each image's class; got {confidence!r}.")
        scale = math.log(confidence * (num_classes - 1) / (1 - confidence)) if num_classes > 1 else 0.0
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be a whole number of at least 1, got {steps!r}.")
    hard = scale * one_hot(labels, num_classes, dtype)
    return backend.xp().stack([hard] * steps).astype(dtype)


def _check_form(form):
    if form not in LABEL_FORMS:
        raise ValueError(f"the label form must be one of {', '.join(LABEL_FORMS)}; got {form!r}.")


def soft_targets(logits, form="softmax"):
    """The training targets t of the label vectors z: softmax(z) along the class axis, or z
    itself for the free form."""
    _check_form(form)
    if form == "free":
        return logits
    return backend.xp().exp(log_softmax(logits.reshape(-1, logits.shape[-1]))).reshape(logits.shape)


def logits_gradient(targets, grad_targets, form="softmax"):
    """∂L/∂z from ∂L/∂t: for t = softmax(z), t ⊙ (∂L/∂t − ⟨t, ∂L/∂t⟩) row by row; for the
    free form (t = z), ∂L/∂t itself."""
    _check_form(form)
    if form == "free":
        return grad_targets
    return targets * (grad_targets - (targets * grad_targets).sum(axis=-1, keepdims=True))


def check_soft_labels(soft_labels, steps, n_images, num_classes=None, form="softmax"):
    """A problem with stored learned labels as one phrase (None when they are fine): they
    must be (S, n, K) finite numbers and, for the softmax form, probability rows summing to 1."""
    s = np.asarray(soft_labels)
    k = s.shape[-1] if s.ndim == 3 else None
    if s.dtype.kind != "f" or s.ndim != 3 or s.shape[:2] != (steps, n_images) or (
            num_classes is not None and k != num_classes):
        want = f"({steps}, {n_images}, {num_classes if num_classes is not None else 'K'})"
        return f"its soft labels have shape {s.shape} and type {s.dtype} (want floats of shape {want})"
    if not np.isfinite(s).all():
        return "its soft labels contain NaN or inf"
    if form != "free" and ((s < 0).any() or not np.allclose(s.sum(axis=-1), 1.0, atol=1e-4)):
        return ("its soft labels are not probability rows (non-negative, summing to 1), as the "
                "softmax label form makes them")
    return None
