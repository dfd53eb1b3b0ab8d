"""Using a distilled set differently from the way it was learned.

Algorithm 1 learns an *ordered schedule* — step s trains on the images x̃[s] with the rate
η̃[e, s] — for one kind of network.  Two questions follow, and both are answered by
measurement here:

* **Step order.**  ``learned``: the schedule as learned.  ``shuffled``: the same images and
  rates, the image groups visited in a random order.  ``pool``: the images as an unordered
  data set, trained by minibatch SGD (as many steps of as many images, one constant learning
  rate tuned on the training split), as one would use an ordinary small data set.
* **Another architecture.**  A network other than the one the set was distilled for, trained
  on the same steps with the learned rates, and with one constant rate tuned on the training
  split.  Images are padded where the other network needs a larger input (28×28 → 32×32).

A set with learned labels (``soft_labels``, (S, n, K), :mod:`ddref.labels`) trains with them
every way: each image keeps its own label when the steps are reordered or pooled.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ddref import backend, nn
from ddref.evaluate import (BASELINE_LR_GRID, Accuracy, TrainingDiverged, accuracies_on,
                            held_out_inits, train_many, train_on_steps)
from ddref.losses import one_hot
from ddref.unroll import sgd_step

ORDERS = ("learned", "shuffled", "pool")


def networks_to_train(model, theta0, n_inits, seed, dtype, inits=None):
    """The θ0 of each evaluation: the networks ``inits`` when given (a pre-trained run's own
    evaluation networks), the stored fixed θ0, else held-out random initialisations."""
    if inits is not None:
        if not len(inits):
            raise ValueError("inits is empty: give at least one network to train.")
        return list(inits)
    return [theta0] if theta0 is not None else held_out_inits(model, n_inits, seed, dtype)


def _test_accuracy(model, dataset, params_list):
    return Accuracy.of(accuracies_on(model.apply, params_list, dataset.x_test, dataset.y_test))


def _as_device(x, dtype):
    return backend.asarray(x, dtype=dtype)


def set_targets(labels, num_classes, dtype, soft_labels=None):
    """The training targets of a set: its learned labels (S, n, K) when it has them, else the
    one-hot rows (n, K) of its fixed ``labels``, shared by every step."""
    if soft_labels is not None:
        return _as_device(soft_labels, dtype)
    return one_hot(labels, num_classes, dtype)


# ---------------------------------------------------------------------------- step order


def train_on_ordered_steps(model, theta0, x_steps, labels, lrs, order, momentum=0.0,
                           soft_labels=None):
    """Train as Algorithm 1 does, visiting the image groups in ``order`` (a permutation of
    the S steps) in every epoch; the rate η̃[e, s] stays with position s of the schedule,
    learned labels move with their images."""
    order = np.asarray(order)
    targets = set_targets(labels, model.num_classes, str(x_steps.dtype), soft_labels)
    if soft_labels is not None:
        targets = targets[order]
    return train_on_steps(model.apply, theta0, x_steps[order], targets, lrs, momentum)


def shuffled_order_accuracy(model, dataset, x_steps, labels, lrs, theta0=None, n_inits=10,
                            n_orders=10, seed=0, momentum=0.0, soft_labels=None, inits=None):
    """Test accuracy with the steps visited in ``n_orders`` random orders (each order paired
    with one network: the fixed θ0, or ``inits`` / held-out inits in turn)."""
    dtype = str(x_steps.dtype)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x0DE5]))
    inits = networks_to_train(model, theta0, n_inits, seed, dtype, inits)
    n = max(n_orders, len(inits))
    orders = [rng.permutation(len(x_steps)) for _ in range(n)]
    starts = [inits[i % len(inits)] for i in range(n)]
    if soft_labels is None:      # one-hot targets are the same in every order: train together
        trained = train_many(model.apply, starts, [x_steps[order] for order in orders],
                             one_hot(labels, model.num_classes, dtype), lrs, momentum)
    else:                        # each order carries its own arrangement of the learned labels
        trained = [train_on_ordered_steps(model, start, x_steps, labels, lrs, order, momentum,
                                          soft_labels) for start, order in zip(starts, orders)]
    return _test_accuracy(model, dataset, trained)


def train_on_pool(model, theta0, images, targets, batch_size, n_steps, lr, rng):
    """Minibatch SGD on an unordered pool of images with their target rows (N, K): each epoch
    shuffles the pool and walks through it in batches of ``batch_size``, until ``n_steps``
    steps are done; one constant ``lr``."""
    dtype = str(images.dtype)
    targets = _as_device(targets, dtype)
    params, done = theta0, 0
    while done < n_steps:
        order = rng.permutation(len(images))
        for start in range(0, len(images) - batch_size + 1, batch_size):
            if done == n_steps:
                break
            batch = order[start: start + batch_size]
            params = sgd_step(model.apply, params, _as_device(images[batch], dtype),
                              targets[backend.asarray(batch)], _as_device(lr, dtype))
            done += 1
    return params


def pool_accuracy(model, dataset, x_steps, labels, epochs, theta0=None, n_inits=10, seed=0,
                  lr_grid=BASELINE_LR_GRID, soft_labels=None, inits=None):
    """The distilled images as an unordered data set: E·S minibatch steps of n images each
    (the same budget as the learned schedule), the constant lr with the best *training-split*
    accuracy on the grid.  Returns (Accuracy on the test split, chosen lr)."""
    steps, n = x_steps.shape[:2]
    dtype = str(x_steps.dtype)
    images = x_steps.reshape(steps * n, *x_steps.shape[2:])
    if soft_labels is None:
        pool_targets = one_hot(np.tile(np.asarray(labels), steps), model.num_classes, dtype)
    else:                            # image i of step s keeps its own learned label
        pool_targets = np.asarray(soft_labels, dtype=dtype).reshape(steps * n, -1)
    inits = networks_to_train(model, theta0, n_inits, seed, dtype, inits)

    def trained(lr):
        rng = np.random.default_rng(np.random.SeedSequence([seed, 0x9001]))
        return [train_on_pool(model, th, images, pool_targets, n, epochs * steps, lr, rng)
                for th in inits]

    def train_split_accuracy(lr):
        try:
            return np.mean(accuracies_on(model.apply, trained(lr), dataset.x_train, dataset.y_train))
        except TrainingDiverged:
            return -np.inf

    best_lr = max(lr_grid, key=train_split_accuracy)
    return _test_accuracy(model, dataset, trained(best_lr)), float(best_lr)


def order_accuracy(order, model, dataset, x_steps, labels, lrs, theta0=None, n_inits=10, seed=0,
                   momentum=0.0, soft_labels=None, inits=None):
    """Accuracy (and, for ``pool``, the tuned lr; else None) of one way of ordering the set.
    ``momentum`` is the inner loop's β, used by the learned and shuffled schedules; the pool is
    trained by plain minibatch SGD.  ``soft_labels``: the set's learned labels, if it has them.
    ``inits``: the networks to train (a pre-trained run's evaluation networks); default the
    fixed θ0 or ``n_inits`` held-out random initialisations."""
    if order not in ORDERS:
        raise ValueError(f"--order must be one of {', '.join(ORDERS)}; got {order!r}.")
    if order == "learned":
        dtype = str(x_steps.dtype)
        inits = networks_to_train(model, theta0, n_inits, seed, dtype, inits)
        trained = train_many(model.apply, inits, x_steps,
                             set_targets(labels, model.num_classes, dtype, soft_labels), lrs, momentum)
        return _test_accuracy(model, dataset, trained), None
    if order == "shuffled":
        return shuffled_order_accuracy(model, dataset, x_steps, labels, lrs, theta0, n_inits,
                                       seed=seed, momentum=momentum, soft_labels=soft_labels,
                                       inits=inits), None
    return pool_accuracy(model, dataset, x_steps, labels, lrs.shape[0], theta0, n_inits, seed,
                         soft_labels=soft_labels, inits=inits)


# ---------------------------------------------------------------------------- other architectures


def pad_images(x, image_shape, background):
    """Images (..., C, H, W) brought to ``image_shape`` (C, H', W') by padding every side
    evenly with ``background`` (per channel: the normalised value of a black pixel).  Only
    growing by an even number of pixels, with the same channels, is supported."""
    c, h, w = image_shape
    c0, h0, w0 = x.shape[-3:]
    if (c0, h0, w0) == (c, h, w):
        return x
    if c0 != c or h < h0 or w < w0 or (h - h0) % 2 or (w - w0) % 2:
        raise nn.ShapeError(
            f"images of shape {(c0, h0, w0)} cannot be padded to {tuple(image_shape)}; choose a "
            f"--model that takes {h0}×{w0} images.")
    ph, pw = (h - h0) // 2, (w - w0) // 2
    padded = np.empty(x.shape[:-3] + (c, h, w), dtype=x.dtype)
    padded[...] = np.asarray(background, dtype=x.dtype).reshape(c, 1, 1)
    padded[..., ph: ph + h0, pw: pw + w0] = x
    return padded


def input_shape_for(model_name, image_shape):
    """The image shape ``model_name`` is built for, given images of ``image_shape``: the
    convnet needs 32×32, lenet 28×28 or 32×32, the mlp takes any size."""
    c, h, w = image_shape
    if model_name == "convnet":
        return (c, 32, 32)
    if model_name == "lenet" and (h, w) not in ((28, 28), (32, 32)):
        return (c, 28, 28) if max(h, w) <= 28 else (c, 32, 32)
    return tuple(image_shape)


def padded_dataset(dataset, image_shape):
    """``dataset`` with its images padded to ``image_shape`` (see :func:`pad_images`)."""
    if tuple(image_shape) == dataset.image_shape:
        return dataset
    background = -np.asarray(dataset.mean, dtype=float) / np.asarray(dataset.std, dtype=float)
    return dataclasses.replace(dataset, x_train=pad_images(dataset.x_train, image_shape, background),
                               x_test=pad_images(dataset.x_test, image_shape, background))


def other_architecture_accuracy(model_name, dataset, x_steps, labels, lrs, n_inits=10, seed=0,
                                lr_grid=BASELINE_LR_GRID, momentum=0.0, soft_labels=None):
    """Train networks of another architecture (held-out random inits) on the distilled steps:
    with the learned rates, and with one constant rate tuned on the training split.  Images
    (distilled, training and test) are padded to the size that network takes.
    Returns {"learned_lrs": Accuracy or None if they make this network diverge,
    "tuned_lr": Accuracy, "lr": the tuned rate}."""
    shape = input_shape_for(model_name, dataset.image_shape)
    dataset = padded_dataset(dataset, shape)
    model = nn.build_model(model_name, shape, dataset.num_classes)
    dtype = str(x_steps.dtype)
    background = -np.asarray(dataset.mean, dtype=float) / np.asarray(dataset.std, dtype=float)
    x = pad_images(x_steps, shape, background)
    inits = held_out_inits(model, n_inits, seed, dtype)
    targets = set_targets(labels, dataset.num_classes, dtype, soft_labels)

    def trained(schedule):
        return train_many(model.apply, inits, x, targets, schedule, momentum)

    def train_split_accuracy(lr):
        try:
            return np.mean(accuracies_on(model.apply, trained(np.full(lrs.shape, lr)),
                                         dataset.x_train, dataset.y_train))
        except TrainingDiverged:
            return -np.inf

    try:
        learned = _test_accuracy(model, dataset, trained(lrs))
    except TrainingDiverged:
        learned = None
    best_lr = max(lr_grid, key=train_split_accuracy)
    tuned = _test_accuracy(model, dataset, trained(np.full(lrs.shape, best_lr)))
    return {"learned_lrs": learned, "tuned_lr": tuned, "lr": float(best_lr)}
