"""Train fresh networks and measure test accuracy.

* :func:`train_full` — ordinary minibatch training on the real training split (the
  "full data" reference, and the way pre-trained initialisations are made).
* :func:`train_on_steps` — train exactly as Algorithm 1 does: the given images in the
  given step order, with the given per-(epoch, step) learning rates.
* :func:`evaluate_distilled` — accuracy of networks trained on a distilled set, from the
  fixed θ0 or as mean ± std over held-out random initialisations.
* :func:`random_real_baseline` — the paper's baseline: the same number of random real
  images, trained the same way, with one learning rate tuned on a small grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from autograd import value_and_grad
from tqdm import tqdm

from ddref import backend
from ddref.losses import accuracy, cross_entropy, one_hot
from ddref.unroll import unroll

BASELINE_LR_GRID = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)


def predict(apply, params, x, batch_size=2048):
    """Logits for ``x`` (host or device array), computed in batches, as a host array."""
    outputs = []
    for start in range(0, len(x), batch_size):
        batch = backend.asarray(x[start: start + batch_size], dtype=_dtype_of(params))
        outputs.append(backend.to_numpy(apply(params, batch)))
    return np.concatenate(outputs)


class TrainingDiverged(ValueError):
    """A network trained on a (distilled or baseline) set ended with NaN or inf outputs."""


def accuracy_on(apply, params, x, y) -> float:
    """Accuracy of the network ``params`` on (x, y); a diverged network is an error, not a
    chance-level number."""
    logits = predict(apply, params, x)
    if not np.isfinite(logits).all():
        raise TrainingDiverged(
            "training on these images diverged (the network's outputs are NaN or inf): the "
            "learning rates are too large for them")
    return accuracy(logits, y)


def _dtype_of(params):
    return next(iter(params.values())).dtype


# ---------------------------------------------------------------------------- full-data training


def train_full(model, dataset, epochs=20, batch_size=64, lr=1e-3, seed=0, dtype="float32",
               theta0=None, progress=True):
    """Adam on minibatches of the real training split; returns the trained parameters.

    Adam (Kingma & Ba) with the usual β = (0.9, 0.999); the same optimiser the outer loop
    of Algorithm 1 uses, see :class:`Adam`.
    """
    rng = backend.rng(seed)
    params = theta0 if theta0 is not None else model.init(rng, dtype=dtype)
    optimiser = Adam(params, lr=lr, betas=(0.9, 0.999))
    loss_and_grad = value_and_grad(
        lambda p, x, t: cross_entropy(model.apply(p, x), t))
    n = len(dataset.y_train)
    batches_per_epoch = max(1, n // batch_size)
    bar = tqdm(range(epochs), desc=f"train {model.name} on {dataset.name}", disable=not progress,
               unit="epoch")
    for _ in bar:
        order = rng.permutation(n)
        losses = []
        for b in range(batches_per_epoch):
            idx = order[b * batch_size: (b + 1) * batch_size]
            x = backend.asarray(dataset.x_train[idx], dtype=dtype)
            t = one_hot(dataset.y_train[idx], dataset.num_classes, dtype)
            loss, grads = loss_and_grad(params, x, t)
            params = optimiser.step(params, grads)
            losses.append(float(loss))
        bar.set_postfix(loss=f"{np.mean(losses):.4f}")
    return params


class Adam:
    """Adam on a dict of arrays:  m ← β1 m + (1−β1) g,  v ← β2 v + (1−β2) g²,
    p ← p − lr · m̂ / (√v̂ + ε) with the bias-corrected m̂ = m/(1−β1ᵗ), v̂ = v/(1−β2ᵗ)."""

    def __init__(self, params, lr=0.01, betas=(0.5, 0.999), eps=1e-8):
        self.lr, self.betas, self.eps = lr, betas, eps
        self.t = 0
        self.m = {k: backend.xp().zeros_like(p) for k, p in params.items()}
        self.v = {k: backend.xp().zeros_like(p) for k, p in params.items()}

    def step(self, params, grads):
        self.t += 1
        b1, b2 = self.betas
        out = {}
        for k in params:
            self.m[k] = b1 * self.m[k] + (1 - b1) * grads[k]
            self.v[k] = b2 * self.v[k] + (1 - b2) * grads[k] ** 2
            m_hat = self.m[k] / (1 - b1 ** self.t)
            v_hat = self.v[k] / (1 - b2 ** self.t)
            out[k] = params[k] - (self.lr * m_hat / (backend.xp().sqrt(v_hat) + self.eps)).astype(
                params[k].dtype)
        return out

    def state(self):
        """Everything needed to continue exactly where it stopped."""
        return {"t": self.t, "lr": self.lr, "m": dict(self.m), "v": dict(self.v)}

    def load_state(self, state):
        self.t, self.lr = int(state["t"]), float(state["lr"])
        self.m = {k: backend.asarray(v) for k, v in state["m"].items()}
        self.v = {k: backend.asarray(v) for k, v in state["v"].items()}


# ---------------------------------------------------------------------------- Algorithm-1 style training


def train_on_steps(apply, theta0, x_steps, targets, lrs, momentum=0.0):
    """Train from θ0 exactly as distillation does: x_steps (S, n, C, H, W), lrs (E, S),
    with the inner loop's momentum β (0: plain gradient descent)."""
    dtype = _dtype_of(theta0)
    args = (apply, theta0, backend.asarray(x_steps, dtype=dtype),
            backend.asarray(targets, dtype=dtype), backend.asarray(lrs, dtype=dtype))
    if momentum:
        from ddref.reversible import momentum_unroll
        return momentum_unroll(*args, momentum=momentum)
    return unroll(*args)


@dataclass(frozen=True)
class Accuracy:
    """Test accuracy as mean ± std over ``n`` trained networks (``n`` = 1: std is 0)."""

    mean: float
    std: float
    n: int
    values: tuple = ()      # the accuracy of each network behind mean ± std

    def __str__(self):
        if self.n == 1:
            return f"{100 * self.mean:.2f}%"
        return f"{100 * self.mean:.2f} ± {100 * self.std:.2f}% (n={self.n})"

    @classmethod
    def of(cls, values):
        values = np.asarray(values, dtype=float)
        return cls(float(values.mean()), float(values.std()), len(values),
                   tuple(float(v) for v in values))


def held_out_inits(model, n, seed, dtype):
    """``n`` fresh initialisations θ0 ~ p(θ0) from a seed that training never uses."""
    rng = backend.rng(np.random.SeedSequence([seed, 0xE7A1]))
    return [model.init(rng, dtype=dtype) for _ in range(n)]


def evaluate_distilled(model, dataset, x_steps, labels, lrs, theta0=None, n_inits=10, seed=0,
                       momentum=0.0, inits=None, soft_labels=None):
    """Test accuracy after training on the distilled steps: from ``theta0`` when given
    (fixed init), from each of ``inits`` when given (pre-trained networks), else mean ± std
    over ``n_inits`` held-out random initialisations.  ``soft_labels`` (S, n, K): learned
    label distributions to train with instead of the one-hot ``labels``."""
    dtype = str(np.asarray(backend.to_numpy(x_steps)).dtype)
    targets = (one_hot(labels, dataset.num_classes, dtype) if soft_labels is None
               else backend.asarray(soft_labels, dtype=dtype))
    if inits is None:
        inits = [theta0] if theta0 is not None else held_out_inits(model, n_inits, seed, dtype)
    accs = [accuracy_on(model.apply, train_on_steps(model.apply, th, x_steps, targets, lrs, momentum),
                          dataset.x_test, dataset.y_test) for th in inits]
    return Accuracy.of(accs)


def sample_real_steps(dataset, steps, labels, rng):
    """Random real training images arranged like a distilled set: for each step, one real
    image of each class listed in ``labels`` (class-major order)."""
    by_class = [np.flatnonzero(dataset.y_train == c) for c in range(dataset.num_classes)]
    picks = []
    for _ in range(steps):
        counts = np.bincount(labels, minlength=dataset.num_classes)
        chosen = {c: list(rng.choice(by_class[c], size=counts[c], replace=False))
                  for c in range(dataset.num_classes) if counts[c]}
        picks.append([chosen[c].pop() for c in labels])
    return dataset.x_train[np.asarray(picks)]


def random_real_baseline(model, dataset, steps, epochs, labels, theta0=None, n_draws=10,
                         seed=0, dtype="float32", lr_grid=BASELINE_LR_GRID, tune_draws=3,
                         inits=None):
    """The paper's baseline: ``steps`` groups of random real images with the same labels as
    the distilled set, trained for the same steps and epochs with one learning rate, from
    ``theta0``, the networks ``inits`` (draw d from ``inits[d % len(inits)]``; pre-trained
    networks) or held-out initialisations.  The learning rate is the grid value with the
    best mean *training-split* accuracy over the first ``tune_draws`` draws
    (:mod:`ddref.baselines` holds the logic).  Returns (Accuracy on the test split, chosen lr)."""
    from ddref import baselines

    n = max(n_draws, tune_draws)
    if inits is not None:
        inits = [inits[d % len(inits)] for d in range(n)]
    else:
        inits = [theta0] if theta0 is not None else held_out_inits(model, n, seed, dtype)
    sets = baselines.baseline_sets("random_real", model, dataset, steps, epochs, labels, inits,
                                   n_draws, seed, lr_grid, tune_draws)
    return baselines.as_training_data(model, dataset, sets, labels, epochs, inits, lr_grid,
                                      tune_draws, n_pairs=n_draws)
