"""The poisoning attack of §3.7, measured as the paper measures it.

Distilled with ``--objective attack``, a set of images makes a network that trains on it
read class K (``source``) as class T (``target``) while keeping the other classes right.
What counts, for networks before and after training on the set (mean ± std over networks):

* ``attack_success``          — share of the test images of class K predicted as T;
* ``other_classes_accuracy``  — accuracy on the test images of every class but K;
* ``accuracy``                — overall accuracy against the true labels;
* ``attacked_accuracy``       — overall accuracy against the attacked labels (K relabelled T);
* ``per_class``               — accuracy on each class.

The baseline is the original code's: the same number of real images, with the images of
class K relabelled T, trained for the same steps and epochs with one learning rate tuned on
the training split (by accuracy against the attacked labels, the attack's own goal).

Everything takes a list of initialisations θ0, so it works for untrained, fixed or pre-trained
networks alike.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ddref import baselines
from ddref.evaluate import Accuracy, TrainingDiverged, predict, train_many
from ddref.losses import attack_targets, one_hot

METRICS = ("attack_success", "other_classes_accuracy", "accuracy", "attacked_accuracy")


# ---------------------------------------------------------------------------- on predicted labels


def check_classes(source, target, num_classes):
    """Raise ValueError unless K and T are two different class indices."""
    attack_targets(np.zeros(0, dtype=int), num_classes, source, target)


def attacked_labels(labels, source, target):
    """The labels the attacker wants: class K relabelled T, every other label kept."""
    labels = np.array(labels, copy=True)
    labels[labels == source] = target
    return labels


def attack_success(predicted, labels, source, target) -> float:
    """Share of the images of class K that are predicted as T."""
    of_source = np.asarray(labels) == source
    if not of_source.any():
        raise ValueError(f"no image of class {source} to attack; check the source class.")
    return float((np.asarray(predicted)[of_source] == target).mean())


def other_classes_accuracy(predicted, labels, source) -> float:
    """Accuracy on the images of every class except K."""
    others = np.asarray(labels) != source
    return float((np.asarray(predicted)[others] == np.asarray(labels)[others]).mean())


def per_class_accuracy(predicted, labels, num_classes) -> np.ndarray:
    """Accuracy on each class, shape (num_classes,) (NaN for a class with no image)."""
    predicted, labels = np.asarray(predicted), np.asarray(labels)
    hits = np.bincount(labels, weights=predicted == labels, minlength=num_classes)
    counts = np.bincount(labels, minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return hits / counts


def attack_metrics(predicted, labels, source, target, num_classes) -> dict:
    """Every attack measure of one network's predictions."""
    predicted, labels = np.asarray(predicted), np.asarray(labels)
    return {"attack_success": attack_success(predicted, labels, source, target),
            "other_classes_accuracy": other_classes_accuracy(predicted, labels, source),
            "accuracy": float((predicted == labels).mean()),
            "attacked_accuracy": float((predicted == attacked_labels(labels, source, target)).mean()),
            "per_class": per_class_accuracy(predicted, labels, num_classes)}


# ---------------------------------------------------------------------------- over networks


@dataclass(frozen=True)
class AttackSummary:
    """The attack measures as mean ± std over ``n`` networks."""

    attack_success: Accuracy
    other_classes_accuracy: Accuracy
    accuracy: Accuracy
    attacked_accuracy: Accuracy
    per_class_mean: tuple
    per_class_std: tuple
    n: int

    def to_dict(self):
        return asdict(self)

    def __str__(self):
        return (f"attack success {self.attack_success}, other classes {self.other_classes_accuracy}, "
                f"accuracy {self.accuracy} (against attacked labels {self.attacked_accuracy})")


def summarise(apply, trained, x, y, source, target, num_classes) -> AttackSummary:
    """The attack measures of networks ``trained`` (a list of parameter dicts) on (x, y)."""
    check_classes(source, target, num_classes)
    rows = [attack_metrics(_finite_predictions(apply, params, x), y, source, target, num_classes)
            for params in trained]
    per_class = np.stack([r["per_class"] for r in rows])
    return AttackSummary(**{m: Accuracy.of([r[m] for r in rows]) for m in METRICS},
                         per_class_mean=tuple(per_class.mean(axis=0).tolist()),
                         per_class_std=tuple(per_class.std(axis=0).tolist()), n=len(rows))


def _finite_predictions(apply, params, x):
    """Predicted classes of one network; a diverged one (NaN or inf outputs) is an error, not
    a set of arbitrary class numbers."""
    logits = predict(apply, params, x)
    if not np.isfinite(logits).all():
        raise TrainingDiverged("training on these images diverged (the network's outputs are NaN "
                               "or inf): the learning rates are too large for them")
    return logits.argmax(axis=1)


def evaluate_attack(model, dataset, x_steps, labels, lrs, inits, source, target,
                    momentum=0.0) -> dict:
    """{'before', 'after'}: the attack measures on the test split of the networks ``inits``
    (a list of θ0) as they are, and after training on the steps x_steps with ``lrs`` and the
    inner momentum β the set was distilled with."""
    check_classes(source, target, dataset.num_classes)
    dtype = str(next(iter(inits[0].values())).dtype)
    targets = one_hot(labels, dataset.num_classes, dtype)
    after = train_many(model.apply, inits, x_steps, targets, lrs, momentum)
    measure = lambda nets: summarise(model.apply, nets, dataset.x_test, dataset.y_test, source,  # noqa: E731
                                     target, dataset.num_classes)
    return {"before": measure(inits), "after": measure(after)}


def confusion_matrix(apply, nets, x, y, num_classes) -> np.ndarray:
    """Entry [i, j]: the share of the images of class i that are predicted as j, averaged over
    the networks ``nets`` (rows sum to 1; a class with no image is a row of NaN)."""
    y = np.asarray(y)
    counts = np.bincount(y, minlength=num_classes)
    matrices = []
    for params in nets:
        predicted = predict(apply, params, x).argmax(axis=1)
        pairs = np.bincount(y * num_classes + predicted, minlength=num_classes ** 2)
        with np.errstate(invalid="ignore", divide="ignore"):
            matrices.append(pairs.reshape(num_classes, num_classes) / counts[:, None])
    return np.mean(matrices, axis=0)


def relabelled_real_sets(dataset, steps, labels, n_draws=10, seed=0) -> list:
    """``n_draws`` sets of random real training images arranged like the distilled set (the
    baseline's draws; train on them with :func:`relabelled_targets`)."""
    return baselines.baseline_sets("random_real", None, dataset, steps, 1, np.asarray(labels),
                                   [None], n_draws, seed, tune_draws=n_draws)[:n_draws]


def relabelled_targets(labels, num_classes, source, target, dtype):
    """One-hot targets of the baseline: the real images of class K labelled T."""
    return attack_targets(np.asarray(labels), num_classes, source, target, dtype)


def train_relabelled(model, dataset, sets, labels, epochs, inits, source, target, lr,
                     momentum=0.0) -> list:
    """θ_T of network i trained on draw i (class K labelled T) at one learning rate ``lr``
    (inner momentum β)."""
    targets = relabelled_targets(labels, dataset.num_classes, source, target, _dtype_of(inits[0]))
    return baselines.train_pairs(model.apply, baselines.pairs_of(sets, inits), targets, epochs, lr,
                                 momentum)


def relabelled_real_baseline(model, dataset, steps, epochs, labels, inits, source, target,
                             n_draws=10, seed=0, lr_grid=baselines.LR_GRID, tune_draws=3,
                             momentum=0.0):
    """The original's attack baseline: random real images arranged like the distilled set,
    those of class K labelled T, trained for the same steps and epochs from ``inits`` (draw i
    with network i) at the lr of ``lr_grid`` with the best training-split accuracy against the
    attacked labels.  Returns ({'before', 'after'} as :func:`evaluate_attack`, lr)."""
    check_classes(source, target, dataset.num_classes)
    labels = np.asarray(labels)
    sets = relabelled_real_sets(dataset, steps, labels, max(n_draws, tune_draws), seed)
    targets = relabelled_targets(labels, dataset.num_classes, source, target, _dtype_of(inits[0]))
    pairs = baselines.pairs_of(sets, inits)
    lr = baselines.tune_lr(model.apply, pairs[:tune_draws], targets, epochs, dataset.x_train,
                           attacked_labels(dataset.y_train, source, target), lr_grid, momentum)
    after = train_relabelled(model, dataset, sets[:n_draws], labels, epochs, inits[:n_draws],
                             source, target, lr, momentum)
    measure = lambda nets: summarise(model.apply, nets, dataset.x_test, dataset.y_test, source,  # noqa: E731
                                     target, dataset.num_classes)
    return {"before": measure(inits[:n_draws]), "after": measure(after)}, lr


def relabelled_real_tradeoff(model, dataset, steps, epochs, labels, inits, source, target,
                             lr_grid=baselines.LR_GRID, n_draws=10, seed=0, momentum=0.0) -> list:
    """[(lr, AttackSummary after training)] for every lr of ``lr_grid``, the same draws and
    networks for each: how attack success trades against the other classes' accuracy as the
    baseline's learning rate grows."""
    check_classes(source, target, dataset.num_classes)
    sets = relabelled_real_sets(dataset, steps, labels, n_draws, seed)
    targets = relabelled_targets(labels, dataset.num_classes, source, target, _dtype_of(inits[0]))
    grid = baselines.train_grid(model.apply, baselines.pairs_of(sets, inits[:n_draws]), targets,
                                epochs, lr_grid, momentum)   # every lr × draw as one computation
    return [(lr, summarise(model.apply, after, dataset.x_test, dataset.y_test, source, target,
                           dataset.num_classes)) for lr, after in zip(lr_grid, grid)]


def _dtype_of(params):
    return str(next(iter(params.values())).dtype)


def attack_report(model, dataset, x_steps, labels, lrs, inits, source, target, n_draws=10, seed=0,
                  lr_grid=baselines.LR_GRID, tune_draws=3, momentum=0.0) -> dict:
    """What ``ddref distill --objective attack`` reports: the distilled set and the relabelled-
    real baseline, before and after training with the run's inner momentum β, over the
    networks ``inits``; JSON-ready."""
    x_steps = np.asarray(x_steps)
    distilled = evaluate_attack(model, dataset, x_steps, labels, lrs, inits, source, target,
                                momentum)
    baseline, lr = relabelled_real_baseline(model, dataset, x_steps.shape[0], np.shape(lrs)[0],
                                            labels, inits, source, target, n_draws, seed, lr_grid,
                                            tune_draws, momentum)
    as_dict = lambda r: {k: v.to_dict() for k, v in r.items()}  # noqa: E731
    return {"source_class": int(source), "target_class": int(target),
            "distilled": as_dict(distilled), "relabelled_real": as_dict(baseline),
            "relabelled_real_lr": lr}


def report_lines(report) -> list:
    """The report as lines for the terminal: one per (set, before/after)."""
    k, t = report["source_class"], report["target_class"]
    lines = [f"attack {k}→{t}: share of test {k}s read as {t} | accuracy on the other classes | "
             f"accuracy (true labels)"]
    for name in ("distilled", "relabelled_real"):
        for when in ("before", "after"):
            r = report[name][when]
            cells = [Accuracy(**r[m]) for m in ("attack_success", "other_classes_accuracy", "accuracy")]
            label = ("distilled" if name == "distilled"
                     else f"relabelled real (lr {report['relabelled_real_lr']:g})")
            lines.append(f"  {label:28s} {when:6s}: " + " | ".join(map(str, cells)))
    return lines
