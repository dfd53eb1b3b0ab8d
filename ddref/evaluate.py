"""Train fresh networks and measure test accuracy.

* :func:`train_full` — ordinary minibatch training on the real training split (the
  "full data" reference, and the way pre-trained initialisations are made).
* :func:`train_on_steps` — train exactly as Algorithm 1 does: the given images in the
  given step order, with the given per-(epoch, step) learning rates.
* :func:`train_many`, :func:`accuracies_on` — the same for many networks at once (held-out
  inits, baseline draws, a learning-rate grid): stacked along a leading axis and trained as
  one batched computation where the model allows it (the MLP), else one after the other.
* :func:`evaluate_distilled` — accuracy of networks trained on a distilled set, from the
  fixed θ0 or as mean ± std over held-out random initialisations.

The paper's random-real baseline lives with the other baselines,
:func:`ddref.baselines.random_real_baseline` (this module knows nothing of them).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from autograd import value_and_grad
from tqdm import tqdm

from ddref import backend, fused
from ddref.losses import accuracy, cross_entropy, one_hot
from ddref.optim import Adam  # noqa: F401  (the outer optimiser, also trains full-data networks)
from ddref.unroll import (check_finite, check_nonnegative_lrs, check_schedule, step_schedule,
                          step_targets, unroll)

BASELINE_LR_GRID = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)


def predict(apply, params, x, batch_size=2048):
    """Logits for ``x`` (host or device array), computed in batches, as a host array."""
    if len(x) == 0:
        raise ValueError("no images to predict: x is empty (check the split or the slice).")
    outputs = []
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):   # callers check finiteness
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
        raise _diverged()
    return accuracy(logits, y)


DIVERGED_FACTOR = 10    # a training loss above 10 × ln K is divergence, not slow learning


def check_trained(model, params, dataset, setting):
    """Raise :class:`TrainingDiverged` when the network's cross-entropy on the training split
    is not finite or is far above chance level ln K (what a network that learned nothing
    scores; above ``DIVERGED_FACTOR`` × ln K): training diverged, and its test accuracy would
    be a meaningless number.  ``setting`` names the option to change, e.g. ``"--lr 1e+06"``."""
    import math

    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        logits = predict(model.apply, params, dataset.x_train)
        loss = float(cross_entropy(logits, one_hot(dataset.y_train, dataset.num_classes,
                                                   str(logits.dtype))))
    chance = math.log(dataset.num_classes)
    if not math.isfinite(loss) or loss > DIVERGED_FACTOR * chance:
        raise TrainingDiverged(
            f"training diverged: the training loss at the end is {loss:.3g}, far above chance "
            f"level {chance:.2f} (ln {dataset.num_classes}); {setting} is too large, try a "
            f"smaller one.")


def _diverged():
    return TrainingDiverged(
        "training on these images diverged (the network's outputs are NaN or inf): the "
        "learning rates are too large for them")


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


# ---------------------------------------------------------------------------- Algorithm-1 style training


def train_on_steps(apply, theta0, x_steps, targets, lrs, momentum=0.0):
    """Train from θ0 exactly as distillation does: x_steps (S, n, C, H, W), lrs (E, S),
    with the inner loop's momentum β (0: plain gradient descent)."""
    dtype = _dtype_of(theta0)
    args = (apply, theta0, backend.asarray(x_steps, dtype=dtype),
            backend.asarray(targets, dtype=dtype), backend.asarray(lrs, dtype=dtype))
    check_nonnegative_lrs(args[4])
    # a diverging network overflows quietly here: accuracy_on / accuracies_on say so in a sentence
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        if momentum:
            from ddref.reversible import momentum_unroll
            return momentum_unroll(*args, momentum=momentum)
        return unroll(*args)


# ---------------------------------------------------------------------------- many networks at once

EVAL_CHUNK = 32   # networks stacked into one computation; more go chunk by chunk.  Memory per
                  # chunk: 32 × (parameters + 2048 test images × the widest layer), ~60 MB for
                  # the MLP on 28×28 images in float32.


def train_many(apply, theta0s, x_steps, targets, lrs, momentum=0.0):
    """θ_T of K networks: network k trained exactly as :func:`train_on_steps` trains it from
    ``theta0s[k]``, here for many networks at once (held-out inits, baseline draws, a grid).

    x_steps : one set (S, n, C, H, W) shared by all, or one per network (a list of K sets or
              an array (K, S, n, C, H, W))
    targets : (n, classes) or per step (S, n, classes), shared by all
    lrs     : (E, S) shared by all, or one schedule per network (K, E, S)

    When the model's fast gradient stacks (the MLP, :class:`ddref.fused.FastGradient`) the K
    networks get a leading axis and every inner step is one batched computation: the loss is
    the sum of the K losses, so each network descends its own gradient, at its own rate.  A
    network that diverges does not disturb the others: its weights turn non-finite (judge it
    with :func:`accuracies_on`).  Other models are trained one after the other."""
    k = len(theta0s)
    if k == 0:
        raise ValueError("no networks to train: give at least one θ0 (n_inits ≥ 1).")
    sets = _one_per_network("x_steps", x_steps, k, 5)
    schedules = _one_per_network("lrs", lrs, k, 2)
    fast = fused.gradient_for(apply, cross_entropy)
    if k < 2 or fast is None or not fast.stackable:
        return [train_on_steps(apply, theta0, x, targets, schedule, momentum)
                for theta0, x, schedule in zip(theta0s, sets, schedules)]
    _check_stackable(sets, schedules, momentum)
    dtype = _dtype_of(theta0s[0])
    targets = backend.asarray(targets, dtype=dtype)
    shared = sets[0] if all(x is sets[0] for x in sets) else None
    trained = []
    for start in range(0, k, EVAL_CHUNK):
        chunk = slice(start, start + EVAL_CHUNK)
        trained += _train_stacked(fast, theta0s[chunk], shared if shared is not None else sets[chunk],
                                  targets, schedules[chunk], momentum, dtype)
    return trained


def _one_per_network(name, value, k, ndim):
    """``value`` as a list of K entries: itself K times when it has ``ndim`` axes (shared),
    else its K entries (a list of K, or an array with one more axis)."""
    if isinstance(value, (list, tuple)) and len(value) == k and np.ndim(value[0]) == ndim:
        return list(value)
    if np.ndim(value) == ndim:
        return [value] * k
    if np.ndim(value) == ndim + 1 and len(value) == k:
        return list(value)
    raise ValueError(
        f"{name} must be one array with {ndim} axes shared by all {k} networks, or {k} of them "
        f"(an array with {ndim + 1} axes); got shape {np.shape(value)}.")


def _check_stackable(sets, schedules, momentum):
    """The checks :func:`train_on_steps` makes, for every network, before anything is trained."""
    for x, schedule in zip(sets, schedules):
        if np.shape(x) != np.shape(sets[0]) or np.shape(schedule) != np.shape(schedules[0]):
            raise ValueError(
                f"networks trained together need sets and learning rates of one shape; got "
                f"{np.shape(x)} with {np.shape(schedule)} beside {np.shape(sets[0])} with "
                f"{np.shape(schedules[0])}: train them in separate calls.")
        check_schedule(backend.asarray(x), backend.asarray(schedule))
        check_finite("the distilled images", backend.asarray(x))
        check_finite("the learning rates", backend.asarray(schedule))
        check_nonnegative_lrs(backend.asarray(schedule))
    if momentum:
        from ddref.reversible import check_momentum
        check_momentum(momentum)


def _train_stacked(fast, theta0s, x_steps, targets, schedules, momentum, dtype):
    """The batched inner loop for K ≤ EVAL_CHUNK networks: x_steps one shared (S, n, C, H, W)
    array or a list of K; returns the K trained parameter dicts."""
    xp = backend.xp()
    k = len(theta0s)
    if isinstance(x_steps, list):       # (S, K, n, C, H, W): step s is one contiguous block
        x_steps = xp.stack([backend.asarray(x, dtype=dtype) for x in x_steps], axis=1)
    else:
        x_steps = backend.asarray(x_steps, dtype=dtype)
    lrs = xp.stack([backend.asarray(schedule, dtype=dtype) for schedule in schedules])  # (K, E, S)
    params = {name: xp.stack([theta0[name] for theta0 in theta0s]) for name in theta0s[0]}
    velocity = {name: xp.zeros_like(p) for name, p in params.items()}
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for e, s in step_schedule(*lrs.shape[1:]):
            _, grads = fast.value_and_grad(params, x_steps[s], step_targets(targets, s))
            lr = lrs[:, e, s]
            if momentum:                # v ← βv − η g,  θ ← θ + v   (reversible.momentum_step)
                velocity = {n: momentum * velocity[n] - _per_row(lr, g) * g for n, g in grads.items()}
                params = {n: params[n] + velocity[n] for n in params}
            else:                       # θ ← θ − η g   (unroll.sgd_step)
                params = {n: p - _per_row(lr, p) * grads[n] for n, p in params.items()}
    return [{name: params[name][i] for name in params} for i in range(k)]


def _per_row(lr, like):
    """The K rates (K,) shaped to multiply an array (K, …) row by row."""
    return lr.reshape((len(lr),) + (1,) * (len(like.shape) - 1))


def accuracies_on(apply, nets, x, y, diverged="raise"):
    """The accuracy on (x, y) of each network in ``nets``, as :func:`accuracy_on` gives it one
    by one; stacked networks (the MLP) share one batched forward pass per batch of images.  A
    network whose outputs are NaN or inf raises :class:`TrainingDiverged` (``diverged="raise"``)
    or scores NaN (``diverged="nan"``) without disturbing the others."""
    if diverged not in ("raise", "nan"):
        raise ValueError(f"diverged must be 'raise' or 'nan', got {diverged!r}.")
    if len(x) == 0 or len(x) != len(y):
        raise ValueError(f"accuracy needs as many labels as images, and at least one; got "
                         f"{len(x)} images and {len(y)} labels.")
    fast = fused.gradient_for(apply, cross_entropy)
    stackable = fast is not None and fast.stackable and len(nets) > 1
    scores, finite = [], []
    for start in range(0, len(nets), EVAL_CHUNK if stackable else 1):
        chunk = nets[start: start + EVAL_CHUNK]
        if stackable:
            predicted, ok = _stacked_predictions(fast, chunk, x)
        else:
            logits = predict(apply, chunk[0], x)
            predicted, ok = logits.argmax(axis=1)[None], np.isfinite(logits).all()[None]
        scores += list((predicted == backend.to_numpy(y)).mean(axis=1))
        finite += list(ok)
    if diverged == "raise" and not all(finite):
        raise _diverged()
    return [float(a) if ok else float("nan") for a, ok in zip(scores, finite)]


def _stacked_predictions(fast, nets, x, batch_size=2048):
    """(K, N) predicted classes and (K,) whether each network's outputs are all finite."""
    params = {name: backend.xp().stack([p[name] for p in nets]) for name in nets[0]}
    dtype = _dtype_of(params)
    predicted, finite = [], np.ones(len(nets), dtype=bool)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for start in range(0, len(x), batch_size):
            h = backend.asarray(x[start: start + batch_size], dtype=dtype)
            for layer in fast.layers:
                h, _ = layer.forward(params, h)
            logits = backend.to_numpy(h)                        # (K, batch, classes)
            finite &= np.isfinite(logits).all(axis=(1, 2))
            predicted.append(logits.argmax(axis=2))
    return np.concatenate(predicted, axis=1), finite


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
        if values.ndim != 1 or values.size == 0:
            raise ValueError(f"an accuracy is the mean of one or more networks' values; got "
                             f"{values.size} values of shape {values.shape}.")
        return cls(float(values.mean()), float(values.std()), len(values),
                   tuple(float(v) for v in values))


def held_out_inits(model, n, seed, dtype):
    """``n`` fresh initialisations θ0 ~ p(θ0) from a seed that training never uses."""
    _check_count("n_inits", n)
    rng = backend.rng(np.random.SeedSequence([seed, 0xE7A1]))
    return [model.init(rng, dtype=dtype) for _ in range(n)]


def _check_count(name, n):
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"{name} must be a whole number of at least 1 (networks to train), got {n!r}.")


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
    trained = train_many(model.apply, inits, x_steps, targets, lrs, momentum)
    return Accuracy.of(accuracies_on(model.apply, trained, dataset.x_test, dataset.y_test))


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
