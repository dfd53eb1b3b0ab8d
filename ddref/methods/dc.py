"""Dataset Condensation with Gradient Matching (DC; Zhao, Mopuri & Bilen, ICLR 2021).

The synthetic set S should make a network take the same training steps as the real set T.
Instead of unrolling training (Algorithm 1 of Wang et al.), DC matches the *gradients* of the
training loss class by class, at parameters θ met along a training trajectory:

    L_DC(S) = Σ_c  D( ∇θ ℓ(S_c; θ),  ∇θ ℓ(T_c; θ) )                                  (paper eq. 9)

    D(A, B) = Σ_layers Σ_rows ( 1 − ⟨A_i, B_i⟩ / (‖A_i‖ ‖B_i‖ + ε) )              (paper eq. 10)

where ℓ is the mean cross-entropy of the network on the images of class c, each weight
tensor is reshaped to (out, −1) (a dense layer's rows are its output units; a convolution's
rows its output channels, each row the in·kh·kw weights of one filter) and A_i, B_i are its rows.
L_DC is a function of the synthetic images through ∇θ ℓ(S_c; θ), so its gradient w.r.t. S is
a second derivative of the network's loss: autograd differentiates through ``grad``.

The paper alternates this with training the network on S (Algorithm 1 of the DC paper):

    for each outer iteration:                    θ ~ p(θ0), a freshly initialised network
        for ol in range(outer_loop):
            S ← S − η_S ∇S L_DC(S; θ)            (SGD, lr 0.1, momentum 0.5, on the images)
            if ol == outer_loop − 1: break
            θ ← train_network(θ, S, epochs=inner_loop)   (SGD, lr 0.01, batch 256)

with (outer_loop, inner_loop) = :func:`schedule` (images per class).  This module gives the
pieces: :func:`dc_loss`, :func:`train_network` and :func:`schedule`; the loop is the caller's.

Where this differs from the official code (VICO-UoE/DatasetCondensation, utils.distance_wb,
match_loss, get_loops; main.py):
- Biases: ``distance_wb`` returns 0 for every 1-D tensor, so bias (and norm-layer) gradients
  are not matched at all; so here (see :func:`layer_distance`).
- Rows that are zero in *both* gradients (a unit that no image of the class switches on) count
  0 here, 1 in the official code (1 − 0/(0 + ε)).  Equal gradients are a perfect match, so the
  loss is 0 when S_c = T_c; the difference is a constant, and changes no gradient.
- ε = 1e-6 as in the official code (``eps``); ``eps=0`` gives the paper's plain cosine.
- ddref's dense weights are stored (in, out); they are transposed to the official (out, in)
  before the rows are taken.  Convolutions are (out, in, kh, kw) in both.
- No augmentation (DSA is a later paper) and no BatchNorm (ddref's networks have none).
"""

from __future__ import annotations

import autograd.numpy as anp
import numpy as np
from autograd import grad
from autograd.extend import defvjp, primitive
from autograd.tracer import getval

from ddref import backend, losses

# The official defaults (main.py), for the caller's loop.
PAPER = {
    "lr_images": 0.1,        # SGD on the synthetic images ...
    "momentum_images": 0.5,  # ... with momentum 0.5
    "lr_net": 0.01,          # SGD on the network inside the loop (train_network)
    "batch_real": 256,       # real images per class per matching step
    "batch_train": 256,      # mini-batch of the synthetic set when training the network
    "iterations": 1000,      # outer iterations (a fresh network each)
    "eps": 1e-6,             # the distance's ε
}

# get_loops: (outer_loop, inner_loop) for each number of images per class, "empirically good"
SCHEDULE = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15), 50: (50, 10)}


def schedule(images_per_class):
    """The paper's (outer_loop, inner_loop) for ``images_per_class`` (the official get_loops).

    outer_loop: matching steps on the images per fresh network; inner_loop: epochs of training
    the network on the synthetic set between two matching steps.  With 1 image per class it is
    (1, 1): one matching step per fresh network and no training (the loop breaks first).
    """
    if images_per_class not in SCHEDULE:
        raise ValueError(
            f"DC's schedule is defined for {', '.join(map(str, SCHEDULE))} images per class, not "
            f"{images_per_class}; choose one of those (or pass outer_loop/inner_loop yourself).")
    return SCHEDULE[images_per_class]


# ---------------------------------------------------------------------------- the distance


@primitive
def _row_norms(rows):
    """‖row‖ for each row of a 2-D array."""
    return backend.xp().sqrt(backend.xp().sum(rows * rows, axis=1))


def _row_norms_vjp(ans, rows):
    # d‖r‖/dr = r/‖r‖; at r = 0 the norm has no derivative and 0 is used (a subgradient).
    # Where a zero row enters the distance, it is multiplied by ⟨a, b⟩ = 0, so the choice
    # changes nothing, and it keeps the gradient finite (plain autograd gives 0 · ∞ = NaN).
    safe = anp.where(ans > 0, ans, 1.0)
    return lambda g: rows * anp.reshape(anp.where(ans > 0, g / safe, 0.0), (-1, 1))


defvjp(_row_norms, _row_norms_vjp)


def as_rows(tensor):
    """A weight tensor as the (out, −1) matrix whose rows the distance compares: a dense weight
    (in, out) is transposed, a convolution (out, in, kh, kw) flattened per output channel."""
    if tensor.ndim == 2:
        return anp.transpose(tensor)
    return anp.reshape(tensor, (tensor.shape[0], -1))


def layer_distance(g_real, g_syn, eps=PAPER["eps"]):
    """Σ_rows (1 − ⟨a_i, b_i⟩ / (‖a_i‖ ‖b_i‖ + ε)) between two gradients of one weight tensor.

    1-D tensors (biases) give 0, as in the official code.  A row that is zero in both gradients
    counts 0 (see the module docstring); a row zero in only one counts 1 (cosine 0).
    """
    if g_real.ndim == 1:
        return 0.0
    a, b = as_rows(g_real), as_rows(g_syn)
    dot = anp.sum(a * b, axis=1)
    den = _row_norms(a) * _row_norms(b) + eps
    den_zero = (getval(den) == 0)              # only when eps = 0 and a row is zero: cos := 0
    cosine = dot / anp.where(den_zero, 1.0, den)
    equal_zero_rows = ((backend.xp().sum(getval(a) ** 2, axis=1) == 0)
                       & (backend.xp().sum(getval(b) ** 2, axis=1) == 0))
    return anp.sum(1.0 - cosine) - float(equal_zero_rows.sum())


def gradient_distance(grads_real, grads_syn, eps=PAPER["eps"]):
    """D(∇θ ℓ(T), ∇θ ℓ(S)): the sum of :func:`layer_distance` over the parameter tensors."""
    return sum(layer_distance(grads_real[k], grads_syn[k], eps) for k in sorted(grads_real))


# ---------------------------------------------------------------------------- the loss


def class_loss(model, params, x, y, num_classes):
    """ℓ(x, y; θ): mean cross-entropy of ``model`` on the images x with integer labels y."""
    return losses.cross_entropy(model.apply(params, x),
                                losses.one_hot(y, num_classes, dtype=x.dtype))


def _class_indices(labels, num_classes, name):
    labels = backend.to_numpy(losses.class_labels(labels, num_classes, name))
    return {c: np.flatnonzero(labels == c) for c in range(num_classes) if np.any(labels == c)}


def matched_classes(y_syn, y_real, num_classes):
    """The indices of each class present in the synthetic labels, in both sets:
    {c: (synthetic indices, real indices)}.  A synthetic class without real images is an error
    (its term of the loss would be undefined)."""
    syn = _class_indices(y_syn, num_classes, "y_syn")
    real = _class_indices(y_real, num_classes, "y_real")
    missing = sorted(set(syn) - set(real))
    if missing:
        raise ValueError(f"the real batch has no images of class(es) {missing} that the synthetic "
                         f"set has; sample the real batch per class (e.g. 256 images of each).")
    return {c: (syn[c], real[c]) for c in syn}


def dc_loss(model, params, x_syn, y_syn, x_real, y_real, num_classes=None, eps=PAPER["eps"]):
    """L_DC(S) = Σ_c D(∇θ ℓ(T_c; θ), ∇θ ℓ(S_c; θ)) at the network parameters ``params``.

    model: a ddref ``Model`` (``model.apply``); params: its parameters θ (constants here);
    x_syn (n, C, H, W), y_syn (n,) int: the synthetic set S; x_real, y_real: a real batch T,
    with images of every class in y_syn.  Differentiate w.r.t. x_syn with autograd (second
    order: the real gradients are constants, the synthetic ones are traced).
    """
    num_classes = model.num_classes if num_classes is None else num_classes
    grad_params = grad(lambda p, x, y: class_loss(model, p, x, y, num_classes))
    total = 0.0
    for c, (i_syn, i_real) in matched_classes(y_syn, y_real, num_classes).items():
        g_real = grad_params(params, x_real[i_real], backend.to_numpy(y_real)[i_real])
        g_syn = grad_params(params, x_syn[i_syn], backend.to_numpy(y_syn)[i_syn])
        total = total + gradient_distance(g_real, g_syn, eps)
    return total


# ---------------------------------------------------------------------------- the inner step


def sgd_step(model, params, x, y, lr=PAPER["lr_net"], num_classes=None):
    """One SGD step on the network: θ ← θ − lr ∇θ ℓ(x, y; θ) (the images are constants)."""
    num_classes = model.num_classes if num_classes is None else num_classes
    g = grad(lambda p: class_loss(model, p, getval(x), y, num_classes))(params)
    return {k: params[k] - lr * g[k] for k in params}


def train_network(model, params, x_syn, y_syn, epochs, lr=PAPER["lr_net"],
                  batch_size=PAPER["batch_train"], rng=None, num_classes=None):
    """θ after ``epochs`` epochs of mini-batch SGD on the synthetic set (the images detached,
    as in the official code): each epoch shuffles S with ``rng`` and steps once per batch of
    ``batch_size``.  With n ≤ batch_size (e.g. 10 classes × 10 images) an epoch is one
    full-batch step and needs no ``rng``."""
    n = len(y_syn)
    if epochs < 0 or batch_size < 1:
        raise ValueError(f"train_network needs epochs ≥ 0 and batch_size ≥ 1, got {epochs} and {batch_size}.")
    if n > batch_size and rng is None:
        raise ValueError(f"train_network shuffles {n} images into batches of {batch_size}: pass rng "
                         f"(a seed or numpy Generator) so the run is reproducible.")
    y_syn = backend.to_numpy(y_syn)
    generator = backend.rng(rng) if n > batch_size else None
    for _ in range(epochs):
        order = np.arange(n) if generator is None else generator.permutation(n)
        for start in range(0, n, batch_size):
            batch = order[start:start + batch_size]
            params = sgd_step(model, params, x_syn[batch], y_syn[batch], lr, num_classes)
    return params
