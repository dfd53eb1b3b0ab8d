"""The baselines of the paper's Table 1: real images arranged like a distilled set.

A distilled set is S steps × n images with fixed labels (class-major: [0,…,0, 1,…,1, …]).
Each baseline fills the same S × n slots with images made from the real training split:

* ``random_real``    — random real images of the slot's class;
* ``optimised_real`` — the best of many random draws, chosen by *training-split* accuracy
  (the original code's ``--test_optimize_n_runs``);
* ``kmeans``         — per class, the centres of scikit-learn's ``KMeans`` with k = (slots of
  the class per step) × S, seeded, ``n_init=KMEANS_N_INIT``;
* ``average``        — each class's mean image in every slot of that class (as the original).

Each is measured two ways:

(a) as training data: exactly the same steps and epochs as the distilled set
    (:func:`ddref.evaluate.train_on_steps`; many networks at once by ``train_many``), with one
    learning rate for every step, the value of ``LR_GRID`` with the best mean accuracy on the
    *training* split, from the same θ0 (fixed init) or the same held-out initialisations
    (random init);
(b) as the stored examples of a 1-nearest-neighbour classifier (Euclidean distance in the
    normalised pixel space) on the test split — distilled images get this row too.

Draws are paired with networks: draw i trains network i (or the one fixed θ0), so a result
is mean ± std over draws and networks together.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from sklearn.cluster import KMeans

from ddref import backend
from ddref.evaluate import (BASELINE_LR_GRID, Accuracy, accuracies_on, held_out_inits,
                            sample_real_steps, train_many)
from ddref.losses import one_hot

BASELINES = ("random_real", "optimised_real", "kmeans", "average")
LR_GRID = BASELINE_LR_GRID   # one lr for all steps and epochs, chosen on the training split
KMEANS_N_INIT = 3            # k-means++ restarts per class; the lowest inertia is kept


# ---------------------------------------------------------------------------- the images


def check_slots(dataset, steps, labels):
    """Raise ValueError if ``labels`` cannot be filled from ``dataset`` for ``steps`` steps."""
    labels = np.asarray(labels)
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}.")
    if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a non-empty 1-D integer array (one per image of a "
                         f"step), got shape {labels.shape} of {labels.dtype}.")
    if labels.min() < 0 or labels.max() >= dataset.num_classes:
        raise ValueError(f"labels must lie in 0..{dataset.num_classes - 1} for {dataset.name}; "
                         f"got {labels.min()}..{labels.max()}.")
    needed = np.bincount(labels, minlength=dataset.num_classes) * steps
    have = np.bincount(dataset.y_train, minlength=dataset.num_classes)
    short = np.flatnonzero(needed > have)
    if short.size:
        c = int(short[0])
        raise ValueError(f"class {c} needs {needed[c]} images ({steps} steps) but {dataset.name} "
                         f"has {have[c]} training images of it; use fewer steps or images per class.")


def arrange(per_class, steps, labels):
    """Images (S, n, C, H, W) from ``per_class[c]`` (S·m_c images of class c, m_c = slots of
    class c per step): slot j of class c in step s gets image s·m_c + j."""
    labels = np.asarray(labels)
    counts = np.bincount(labels)
    occurrence = np.array([np.sum(labels[:i] == c) for i, c in enumerate(labels)])
    return np.stack([np.stack([per_class[c][s * counts[c] + j] for c, j in zip(labels, occurrence)])
                     for s in range(steps)])


def random_real_steps(dataset, steps, labels, rng):
    """One draw of random real training images arranged like a distilled set."""
    check_slots(dataset, steps, labels)
    return sample_real_steps(dataset, steps, np.asarray(labels), rng)


def kmeans_steps(dataset, steps, labels, seed=0, n_init=KMEANS_N_INIT):
    """Per class c, the k = m_c · S centres of k-means on the class's training images."""
    check_slots(dataset, steps, labels)
    counts = np.bincount(labels, minlength=dataset.num_classes)
    per_class = {}
    for c in np.flatnonzero(counts):
        x = dataset.x_train[dataset.y_train == c]
        km = KMeans(n_clusters=int(counts[c] * steps), n_init=n_init, random_state=seed)
        centres = km.fit(x.reshape(len(x), -1).astype(np.float64)).cluster_centers_
        per_class[c] = centres.reshape(-1, *x.shape[1:]).astype(dataset.x_train.dtype)
    return arrange(per_class, steps, labels)


def average_steps(dataset, steps, labels):
    """Each class's mean training image, in every slot of that class."""
    check_slots(dataset, steps, labels)
    counts = np.bincount(labels, minlength=dataset.num_classes)
    per_class = {c: np.repeat(dataset.x_train[dataset.y_train == c].mean(axis=0, keepdims=True),
                              counts[c] * steps, axis=0) for c in np.flatnonzero(counts)}
    return arrange(per_class, steps, labels)


# ---------------------------------------------------------------------------- (a) as training data


def pairs_of(sets, inits):
    """Pair draw i with network i; the shorter list is recycled (one set or one fixed θ0 is
    shared by all)."""
    if not len(sets) or not len(inits):
        raise ValueError(f"pairing needs at least one image set and one network; got "
                         f"{len(sets)} sets and {len(inits)} networks.")
    n = max(len(sets), len(inits))
    return [(sets[i % len(sets)], inits[i % len(inits)]) for i in range(n)]


def train_pairs(apply, pairs, targets, epochs, lr, momentum=0.0):
    """θ_T for each (images, θ0) pair, every step and epoch at learning rate ``lr`` with the
    inner loop's momentum β (the pairs trained together, :func:`ddref.evaluate.train_many`)."""
    return train_grid(apply, pairs, targets, epochs, [lr], momentum)[0]


def train_grid(apply, pairs, targets, epochs, lr_grid, momentum=0.0):
    """[θ_T of every pair] for each lr of ``lr_grid``: all lrs × pairs as one computation."""
    if not len(pairs) or not len(lr_grid):
        raise ValueError(f"training needs at least one (images, θ0) pair and one learning rate; "
                         f"got {len(pairs)} pairs and {len(lr_grid)} rates.")
    if isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer)) or epochs < 1:
        raise ValueError(f"epochs must be a whole number of at least 1, got {epochs!r}.")
    steps = len(pairs[0][0])
    runs = [(x, theta0, np.full((epochs, steps), lr)) for lr in lr_grid for x, theta0 in pairs]
    trained = train_many(apply, [r[1] for r in runs], [r[0] for r in runs], targets,
                         [r[2] for r in runs], momentum)
    return [trained[i: i + len(pairs)] for i in range(0, len(trained), len(pairs))]


def tune_lr(apply, pairs, targets, epochs, x, y, lr_grid=LR_GRID, momentum=0.0):
    """The value of ``lr_grid`` whose trained networks score best on (x, y), mean over pairs.
    Pass the training split (never the test split).  An lr whose training diverges (a
    non-finite weight or output) scores −∞: too large a grid value is a bad choice, not an
    error, and it does not disturb the others (every network is judged on its own)."""
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        flat = [theta for group in train_grid(apply, pairs, targets, epochs, lr_grid, momentum)
                for theta in group]
        accs = accuracies_on(apply, flat, x, y, diverged="nan")
    finite = [_all_finite(theta) and np.isfinite(a) for theta, a in zip(flat, accs)]
    n = len(pairs)
    scores = [np.mean(accs[i: i + n]) if all(finite[i: i + n]) else -np.inf
              for i in range(0, len(flat), n)]
    return float(lr_grid[max(range(len(lr_grid)), key=scores.__getitem__)])


def _all_finite(params):
    return all(bool(backend.xp().isfinite(w).all()) for w in params.values())


def as_training_data(model, dataset, sets, labels, epochs, inits, lr_grid=LR_GRID, tune_pairs=3,
                     n_pairs=None, momentum=0.0, tune_split=None):
    """Test accuracy (mean ± std over pairs) of networks trained on ``sets`` (inner momentum
    β = ``momentum``, as the distilled set is) with the lr tuned on the training split over the
    first ``tune_pairs`` pairs; returns (Accuracy, lr).  ``n_pairs`` limits how many pairs are
    evaluated (default all).  ``tune_split``: (x, y) drawn from the training split to tune on
    instead of all of it (a full-size split is slow to score |LR_GRID| × pairs times)."""
    if isinstance(tune_pairs, bool) or not isinstance(tune_pairs, (int, np.integer)) or tune_pairs < 1:
        raise ValueError(f"tune_draws must be at least 1 (pairs the lr is tuned on), got {tune_pairs!r}.")
    targets = one_hot(labels, dataset.num_classes, _dtype_of(inits[0]))
    pairs = pairs_of(sets, inits)
    x_tune, y_tune = tune_split if tune_split is not None else (dataset.x_train, dataset.y_train)
    lr = tune_lr(model.apply, pairs[:tune_pairs], targets, epochs, x_tune, y_tune, lr_grid, momentum)
    trained = train_pairs(model.apply, pairs[:n_pairs], targets, epochs, lr, momentum)
    return Accuracy.of(accuracies_on(model.apply, trained, dataset.x_test, dataset.y_test)), lr


def scoring_inits(model, n, seed, dtype):
    """``n`` initialisations that rank optimised-real candidates under random init: drawn from
    their own seed stream, so they are never the held-out networks the test uses."""
    rng = backend.rng(np.random.SeedSequence([seed, 0x5C0E]))
    return [model.init(rng, dtype=dtype) for _ in range(n)]


def optimised_real_sets(model, dataset, steps, epochs, labels, score_inits, lr, n_candidates,
                        n_keep, rng, momentum=0.0, eval_inits=()):
    """The ``n_keep`` best of ``n_candidates`` random real draws, ranked by mean *training-split*
    accuracy of networks trained on each from ``score_inits`` at learning rate ``lr``.

    The ranking networks must not be the networks the kept draws are then judged on
    (``eval_inits``): a draw chosen by the very networks that score it is scored twice."""
    if n_keep > n_candidates:
        raise ValueError(f"cannot keep the best {n_keep} of {n_candidates} candidate draws; "
                         f"raise n_candidates.")
    check_scoring_networks(score_inits, eval_inits)
    targets = one_hot(labels, dataset.num_classes, _dtype_of(score_inits[0]))
    candidates = [random_real_steps(dataset, steps, labels, rng) for _ in range(n_candidates)]

    pairs = [(x, theta0) for x in candidates for theta0 in score_inits]   # all trained together
    accs = accuracies_on(model.apply, train_pairs(model.apply, pairs, targets, epochs, lr, momentum),
                         dataset.x_train, dataset.y_train)
    n = len(score_inits)
    scores = [np.mean(accs[i: i + n]) for i in range(0, len(accs), n)]
    best = np.argsort(scores, kind="stable")[::-1][:n_keep]
    return [candidates[i] for i in best]


def check_scoring_networks(score_inits, eval_inits=()):
    """Raise ValueError unless ``score_inits`` is a non-empty list of networks none of which is
    one of ``eval_inits`` (the networks the chosen draws are measured on).  One exception: a
    fixed θ0 (``eval_inits`` one network) ranks its own draws, as the distilled set is learned
    for it — there is no held-out network to keep apart."""
    if not score_inits:
        raise ValueError("optimised_real needs its own scoring networks (score_inits) to rank the "
                         "candidates: pass baselines.scoring_inits(...), never the evaluation networks.")
    if len(eval_inits) == 1:
        return
    for theta in score_inits:
        for other in eval_inits:
            if other is not None and _same_network(theta, other):
                raise ValueError("score_inits include a network the baseline is evaluated on: rank "
                                 "the candidates with networks of their own (baselines.scoring_inits).")


def _same_network(a, b):
    if a is b:
        return True
    if a.keys() != b.keys():
        return False
    return all(np.shape(a[k]) == np.shape(b[k])
               and np.array_equal(backend.to_numpy(a[k]), backend.to_numpy(b[k])) for k in a)


# ---------------------------------------------------------------------------- (b) nearest neighbour


def nearest_neighbour_accuracy(x_steps, labels, x_test, y_test, batch_size=1024):
    """Test accuracy of 1-nearest-neighbour (Euclidean) with the S × n images of ``x_steps``
    and their labels as the stored examples."""
    x_steps = np.asarray(backend.to_numpy(x_steps), dtype=np.float64)
    labels = np.asarray(backend.to_numpy(labels))
    if x_steps.ndim < 3 or x_steps.shape[0] * x_steps.shape[1] == 0:
        raise ValueError(f"x_steps must be the stored images (steps, n, …) with at least one "
                         f"image; got shape {x_steps.shape}.")
    if labels.shape != (x_steps.shape[1],):
        raise ValueError(f"labels must give one class per image of a step, shape "
                         f"({x_steps.shape[1]},); got shape {labels.shape}.")
    if len(x_test) == 0 or len(x_test) != len(y_test) or tuple(np.shape(x_test)[1:]) != x_steps.shape[2:]:
        raise ValueError(f"x_test must hold at least one image shaped like the stored ones "
                         f"{x_steps.shape[2:]}, with one label each; got x_test "
                         f"{np.shape(x_test)} and y_test {np.shape(y_test)}.")
    stored = x_steps.reshape(-1, int(np.prod(x_steps.shape[2:])))
    stored_labels = np.tile(labels, x_steps.shape[0])
    stored_sq = (stored ** 2).sum(axis=1)
    predictions = []
    for start in range(0, len(x_test), batch_size):
        q = np.asarray(x_test[start: start + batch_size], dtype=np.float64).reshape(-1, stored.shape[1])
        distances = stored_sq[None, :] - 2 * q @ stored.T   # ‖q − s‖² − ‖q‖²: same arg-min
        predictions.append(stored_labels[distances.argmin(axis=1)])
    return float((np.concatenate(predictions) == np.asarray(y_test)).mean())


# ---------------------------------------------------------------------------- a baseline, both ways


@dataclass(frozen=True)
class BaselineResult:
    """One baseline: test accuracy as training data (with its tuned lr) and as 1-NN examples;
    ``sets``: the image sets (S, n, C, H, W) both were measured on (one per draw)."""

    name: str
    training: Accuracy
    lr: float
    nearest_neighbour: Accuracy
    n_images: int
    sets: tuple = field(default=(), repr=False, compare=False)


def baseline_sets(name, model, dataset, steps, epochs, labels, inits, n_draws=10, seed=0,
                  lr_grid=LR_GRID, tune_draws=3, n_candidates=20, score_inits=None,
                  kmeans_n_init=KMEANS_N_INIT, kmeans_draws=None, momentum=0.0):
    """The image sets of baseline ``name`` (one per draw; ``average`` is one set).  Only
    ``optimised_real`` trains anything: its candidates are ranked on the training split at the
    lr tuned for random real, by the networks ``score_inits`` (required, and none of them one
    of ``inits``; see :func:`scoring_inits`).  k-means is slow on large classes:
    ``kmeans_draws`` (default ``n_draws``) seeds, recycled over the networks."""
    labels = np.asarray(labels)
    check_slots(dataset, steps, labels)
    if n_draws < 1:
        raise ValueError(f"n_draws must be at least 1, got {n_draws}.")
    rng = backend.rng(np.random.SeedSequence([seed, 0xBA5E]))
    if name == "random_real":
        return [random_real_steps(dataset, steps, labels, rng) for _ in range(max(n_draws, tune_draws))]
    if name == "optimised_real":
        check_scoring_networks(score_inits, inits)
        random_sets = baseline_sets("random_real", model, dataset, steps, epochs, labels, inits,
                                    tune_draws, seed, lr_grid, tune_draws)
        targets = one_hot(labels, dataset.num_classes, _dtype_of(inits[0]))
        lr = tune_lr(model.apply, pairs_of(random_sets, inits)[:tune_draws], targets, epochs,
                     dataset.x_train, dataset.y_train, lr_grid, momentum)
        candidates_rng = backend.rng(np.random.SeedSequence([seed, 0x0B7]))
        return optimised_real_sets(model, dataset, steps, epochs, labels, score_inits, lr,
                                   n_candidates, n_draws, candidates_rng, momentum, inits)
    if name == "kmeans":
        return [kmeans_steps(dataset, steps, labels, seed=int(rng.integers(2 ** 31)), n_init=kmeans_n_init)
                for _ in range(kmeans_draws or n_draws)]
    if name == "average":
        return [average_steps(dataset, steps, labels)]
    raise ValueError(f"unknown baseline {name!r}: choose one of {', '.join(BASELINES)}.")


def run_baseline(name, model, dataset, steps, epochs, labels, inits, n_draws=10, seed=0,
                 lr_grid=LR_GRID, tune_draws=3, momentum=0.0, tune_split=None,
                 **options) -> BaselineResult:
    """Baseline ``name`` both ways: trained on for ``steps`` × ``epochs`` from ``inits`` (one
    fixed θ0, or one network per draw) with the inner momentum β, and as 1-NN stored examples
    (``tune_split``: see :func:`as_training_data`).
    ``options`` go to :func:`baseline_sets` (n_candidates, score_inits, kmeans_n_init,
    kmeans_draws)."""
    model.check_input((1, *dataset.image_shape))
    sets = baseline_sets(name, model, dataset, steps, epochs, labels, inits, n_draws, seed,
                         lr_grid, tune_draws, momentum=momentum, **options)
    n_pairs = len(pairs_of(sets[:n_draws], inits[:n_draws]))
    training, lr = as_training_data(model, dataset, sets, labels, epochs, inits, lr_grid,
                                    tune_draws, n_pairs=n_pairs, momentum=momentum,
                                    tune_split=tune_split)
    nn_accs = [nearest_neighbour_accuracy(x, labels, dataset.x_test, dataset.y_test)
               for x in sets[:n_draws]]
    return BaselineResult(name, training, lr, Accuracy.of(nn_accs), int(np.prod(sets[0].shape[:2])),
                          tuple(sets[:n_draws]))


def random_real_baseline(model, dataset, steps, epochs, labels, theta0=None, n_draws=10,
                         seed=0, dtype="float32", lr_grid=LR_GRID, tune_draws=3,
                         inits=None, momentum=0.0):
    """The paper's baseline: ``steps`` groups of random real images with the same labels as
    the distilled set, trained for the same steps and epochs with one learning rate and the
    inner momentum β of the run, from ``theta0``, the networks ``inits`` (draw d from
    ``inits[d % len(inits)]``; pre-trained networks) or held-out initialisations.  The
    learning rate is the grid value with the best mean *training-split* accuracy over the
    first ``tune_draws`` draws.  Returns (Accuracy on the test split, chosen lr)."""
    n = max(n_draws, tune_draws)
    if inits is not None:
        inits = [inits[d % len(inits)] for d in range(n)]
    else:
        inits = [theta0] if theta0 is not None else held_out_inits(model, n, seed, dtype)
    sets = baseline_sets("random_real", model, dataset, steps, epochs, labels, inits,
                         n_draws, seed, lr_grid, tune_draws)
    return as_training_data(model, dataset, sets, labels, epochs, inits, lr_grid, tune_draws,
                            n_pairs=n_draws, momentum=momentum)


def _dtype_of(params):
    return str(next(iter(params.values())).dtype)
