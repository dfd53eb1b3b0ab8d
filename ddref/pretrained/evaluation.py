"""A distilled set of a pre-trained mode, evaluated on the networks of its pools.

Mean ± std over the networks of four numbers on the target test split: the networks as
they are, after the distilled steps, after as many random real images, and after
fine-tuning on the whole target training split (:data:`METRIC_NAMES`).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from tqdm import tqdm

from ddref import backend, data, nn
from ddref.baselines import random_real_baseline
from ddref.evaluate import Accuracy, accuracies_on, accuracy_on, evaluate_distilled, train_full
from ddref.pretrained.pool import BATCH_SIZE
from ddref.pretrained.training import RunPools, pools_for

FINE_TUNE_EPOCHS = 3                   # full_target_accuracy: Adam epochs on the whole target split


def evaluate(model, target: data.Dataset, x_steps, labels, lrs, nets, seed=0, baseline_draws=None,
             fine_tune_epochs=FINE_TUNE_EPOCHS, fine_tune_lr=1e-3, progress=False,
             momentum=0.0) -> dict:
    """The pre-trained-mode metrics on the target test split, mean ± std over ``nets``
    (the distilled and random-real steps trained with the run's inner momentum β):

    before_accuracy       the networks as they are;
    distilled_accuracy    after training on the distilled steps (x_steps, lrs);
    random_real_accuracy  after the same steps on as many random real target images, with one
                          learning rate tuned on the target training split;
    full_target_accuracy  after ``fine_tune_epochs`` of Adam on the whole target training split.
    """
    dtype = str(backend.to_numpy(x_steps).dtype)
    steps, epochs = x_steps.shape[0], lrs.shape[0]
    before = accuracies_on(model.apply, nets, target.x_test, target.y_test)
    distilled = evaluate_distilled(model, target, x_steps, labels, lrs, inits=nets,
                                   momentum=momentum)
    with np.errstate(over="ignore", invalid="ignore"):  # the lr grid's largest values diverge
        baseline, baseline_lr = random_real_baseline(
            model, target, steps, epochs, labels, inits=nets, n_draws=baseline_draws or len(nets),
            seed=seed, dtype=dtype, momentum=momentum)
    full = []
    for i, th in enumerate(tqdm(nets, desc="fine-tune on the target", disable=not progress)):
        tuned = train_full(model, target, epochs=fine_tune_epochs, lr=fine_tune_lr, seed=seed + i,
                           dtype=dtype, theta0=th, progress=False)
        full.append(accuracy_on(model.apply, tuned, target.x_test, target.y_test))
    return {"before_accuracy": dataclasses.asdict(Accuracy.of(before)),
            "distilled_accuracy": dataclasses.asdict(distilled),
            "random_real_accuracy": dataclasses.asdict(baseline),
            "random_real_lr": baseline_lr,
            "full_target_accuracy": dataclasses.asdict(Accuracy.of(full)),
            "full_target_fine_tune": {"epochs": fine_tune_epochs, "lr": fine_tune_lr,
                                      "optimiser": "adam", "batch_size": BATCH_SIZE}}


def evaluation_networks(config, pools: RunPools, n_nets=None) -> tuple:
    """(pool, ids): fixed-pretrained is evaluated on its own network, random-pretrained on
    the first ``n_nets`` (default ``eval_inits``) networks of the held-out pool."""
    if config.init == "fixed-pretrained":
        return pools.train, [config.pretrained_net]
    return pools.held_out, list(range(n_nets or config.eval_inits))


def evaluate_run(config, model, target, x_steps, labels, lrs, pools: RunPools, n_nets=None,
                 baseline_draws=None, progress=False) -> dict:
    """:func:`evaluate` on the networks ``config`` is evaluated on, with which ones recorded."""
    pool, ids = evaluation_networks(config, pools, n_nets)
    x = backend.asarray(x_steps, dtype=config.dtype)
    metrics = evaluate(model, target, x, labels, backend.asarray(lrs, dtype=config.dtype),
                       pool.networks(ids, config.dtype), seed=config.seed,
                       baseline_draws=baseline_draws, progress=progress, momentum=config.momentum)
    metrics["evaluated_on"] = {"pool": pool.meta["spec"]["split"], "file": pool.path.name,
                               "network_ids": ids}
    return metrics


def evaluate_saved(distilled, n_nets=None, baseline_draws=None, progress=True, root=None) -> dict:
    """Re-evaluate a saved pre-trained-mode distilled set on the pool(s) it records."""
    from ddref.config import DistillConfig

    config = DistillConfig.from_dict(distilled.config)
    target = data.load(config.dataset)
    model = nn.build_model(config.model, target.image_shape, target.num_classes)
    model.check_input(distilled.images.shape)
    pools = pools_for(config, target, progress=progress, root=root,
                      held_out_nets=n_nets if n_nets and n_nets > config.eval_inits else None)
    return evaluate_run(config, model, target, distilled.images, distilled.labels, distilled.lrs,
                        pools, n_nets=n_nets, baseline_draws=baseline_draws)


METRIC_NAMES = ("before_accuracy", "distilled_accuracy", "random_real_accuracy",
                "full_target_accuracy")


def summary_lines(metrics: dict) -> list:
    """The printed summary: one line per metric, as mean ± std over the networks."""
    labels = {"before_accuracy": "pre-trained, as they are",
              "distilled_accuracy": "after the distilled steps",
              "random_real_accuracy": "after as many random real images",
              "full_target_accuracy": "fine-tuned on the whole target"}
    lines = []
    for name in METRIC_NAMES:
        acc = Accuracy(**metrics[name])
        extra = f" (lr {metrics['random_real_lr']:g})" if name == "random_real_accuracy" else ""
        lines.append(f"  {name:22s} {labels[name]:34s} {acc}{extra}")
    return lines
