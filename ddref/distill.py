"""Run a distillation method from a :class:`DistillConfig`, and judge a saved set again.

:class:`Distiller` is the outer loop (:mod:`ddref.loop`) with the objective the config names
(:mod:`ddref.objectives`; Algorithm 1 by default), its data set loaded and its random
generator seeded:

    distiller = Distiller(DistillConfig(steps=1, epochs=3)).run()
    result = distiller.distilled_set()
    held_out_accuracy(result)          # the same accuracy again, from the saved set alone
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ddref import backend, data, nn, objectives
from ddref.config import (INIT_MODES, OBJECTIVES, PRETRAINED, RESUMABLE, SAMPLED, DistillConfig,
                          DistillError, option_name, with_resume_changes)
from ddref.evaluate import Accuracy, evaluate_distilled, held_out_inits
from ddref.loop import History, OuterLoop
from ddref.saved import DistilledSet, SavedFileError, json_field, load_npz


def distilled_labels(num_classes, images_per_class):
    """The fixed labels of every step: class-major, [0,…,0, 1,…,1, …] as in the original code."""
    return np.repeat(np.arange(num_classes), images_per_class)


class Distiller(OuterLoop):
    """The outer loop for ``config``: its data set (loaded unless given), its objective, a
    generator seeded with ``config.seed``.  Attributes of the objective (``model``,
    ``dataset``, ``labels``, ``theta0``, ``pools`` …) read through."""

    def __init__(self, config: DistillConfig, dataset=None, progress=True):
        config = objectives.check(config)
        dataset = dataset if dataset is not None else data.load(config.dataset, dtype=config.dtype)
        objective = objectives.build(config, dataset, backend.rng(config.seed), progress)
        super().__init__(objective, config, progress)

    def __getattr__(self, name):
        if name == "objective":           # not set yet: no recursion while building
            raise AttributeError(name)
        return getattr(self.objective, name)

    # the learned arrays by name, and what Algorithm 1 computes from them
    x = property(lambda self: self.learned["x"], lambda self, v: self._set("x", v))
    raw_lrs = property(lambda self: self.learned["raw_lrs"], lambda self, v: self._set("raw_lrs", v))
    label_logits = property(lambda self: self.learned.get("label_logits"),
                            lambda self, v: self._set("label_logits", v))
    adam = property(lambda self: self.optimiser)

    def _set(self, name, value):
        self.learned = {**self.learned, name: value}

    def lrs(self):
        return self.objective.lrs(self.learned)

    def soft_labels(self):
        return self.objective.soft_labels(self.learned)

    def meta_gradients(self):
        return self.objective.meta_gradients(self.learned)

    def meta_gradient(self):
        """(outer loss, ∂L/∂x̃, ∂L/∂raw η̃), averaged over the ``n_nets`` networks."""
        loss, grads = self.meta_gradients()
        return loss, grads["x"], grads["raw_lrs"]

    def meta_gradients_in_order(self):
        """:meth:`meta_gradients` with the steps in the configured order."""
        return self.objective.loss_and_grads(self.learned)

    def meta_gradient_in_order(self):
        """:meth:`meta_gradient` with the steps in the configured order."""
        loss, grads = self.meta_gradients_in_order()
        return loss, grads["x"], grads["raw_lrs"]

    @classmethod
    def from_checkpoint(cls, path, dataset=None, progress=True, changes=None):
        """Rebuild a Distiller exactly as it was when ``path`` was written.

        ``changes`` maps config fields to new values; only the fields in
        :data:`RESUMABLE` may differ from the checkpoint's (a value equal to the saved one is
        always accepted), anything else is refused with one sentence.
        """
        arrays = load_npz(path, "checkpoint")
        if "config" not in arrays:
            raise DistillError(f"{path} is not a ddref checkpoint (it lacks config); start a new "
                               f"run with --force.")
        try:
            config = DistillConfig.from_dict(json_field(arrays, "config", path, "checkpoint")).validate()
        except (TypeError, ValueError) as error:
            raise DistillError(f"{path} holds an unusable config ({error}); start a new run "
                               f"with --force.") from None
        config = with_resume_changes(config, changes or {}, path)
        distiller = cls(config, dataset=dataset, progress=progress).load_state(arrays, path)
        if config.iterations < distiller.iteration:
            raise DistillError(f"--iterations {config.iterations} is fewer than the "
                               f"{distiller.iteration} iterations the run in {Path(path).parent} "
                               f"has done; give --iterations {distiller.iteration} or more.")
        return distiller


def prepared_for_evaluation(distilled: DistilledSet, dataset=None, source="distilled set"):
    """Everything needed to train on a saved set, after checking that it fits its data set and
    model: (config, dataset, model, images, lrs, θ0 or None), arrays on the host in the run's
    dtype."""
    try:
        config = DistillConfig.from_dict(distilled.config).validate()
    except (TypeError, ValueError) as error:
        raise SavedFileError(f"{source}: its config cannot be used ({error}); make it again "
                             f"with `ddref distill`.") from None
    dataset = dataset if dataset is not None else data.load(config.dataset, dtype=config.dtype)
    model = nn.build_model(config.model, dataset.image_shape, dataset.num_classes,
                           **config.model_options())
    model.check_input(distilled.images.shape)
    distilled.check(dataset.num_classes, source)
    distilled.check_theta0(model.init.shapes, source)
    if config.init == "fixed" and distilled.theta0 is None:
        raise SavedFileError(f"{source}: it was distilled for a fixed θ0 but does not store it; "
                             f"make it again with `ddref distill`.")
    theta0 = None
    if distilled.theta0 is not None:
        theta0 = {k: backend.asarray(v, dtype=config.dtype) for k, v in distilled.theta0.items()}
    images = np.asarray(distilled.images, dtype=config.dtype)
    lrs = np.asarray(distilled.lrs, dtype=config.dtype)
    return config, dataset, model, images, lrs, theta0


def check_n_inits(n_inits, config, source="distilled set"):
    """``--n-inits`` means something only for sets distilled for random initialisations."""
    if n_inits is not None and not config.init.startswith("random"):
        raise ValueError(f"--n-inits applies to sets distilled for random initialisations; "
                         f"{source} was distilled for one fixed θ0, which it stores: leave "
                         f"--n-inits out.")


def held_out_accuracy(distilled: DistilledSet, dataset=None, n_inits=None, source="distilled set") -> Accuracy:
    """Re-evaluate a saved distilled set the way the run that made it did.  Algorithm 1's sets:
    the test accuracy after training on their steps with their learned rates from the networks
    the run was judged on — its stored θ0 (fixed, fixed-pretrained), its held-out random
    initialisations (random) or the first networks of its recorded held-out pool
    (random-pretrained) — the run's ``distilled_accuracy``.  The sets of dc, dm and kip (pools):
    the field protocol with the run's --field-epochs and seed (ddref.objectives.pool).

        held_out_accuracy(DistilledSet.load("runs/digits-mlp-fixed/distilled.npz"))
    """
    config, dataset, model, images, lrs, theta0 = prepared_for_evaluation(distilled, dataset, source)
    check_n_inits(n_inits, config, source)
    if config.method != "bptt":
        from ddref.objectives.pool import field_accuracy

        return field_accuracy(config, model, dataset, images, distilled.labels,
                              distilled.soft_labels, n_inits or config.eval_inits)
    soft = None if distilled.soft_labels is None else backend.asarray(distilled.soft_labels,
                                                                       dtype=config.dtype)
    return evaluate_distilled(model, dataset, backend.asarray(images), distilled.labels,
                              backend.asarray(lrs), momentum=config.momentum, soft_labels=soft,
                              inits=evaluation_networks(config, dataset, model, theta0, n_inits))


def evaluation_networks(config, dataset, model, theta0, n_inits=None) -> list:
    """The θ0 of the networks a saved set is judged on, as the run that made it chose them: its
    stored θ0 (fixed, fixed-pretrained), the first ``n_inits`` (default ``--eval-inits``)
    networks of its recorded held-out pool (random-pretrained), or as many held-out random
    initialisations (random)."""
    if theta0 is not None:
        return [theta0]
    n = n_inits or config.eval_inits
    if config.init == "random-pretrained":
        from ddref import pretrained

        pools = pretrained.pools_for(config, dataset, held_out_nets=(
            n if n > config.eval_inits else None))
        pool, ids = pretrained.evaluation_networks(config, pools, n)
        return pool.networks(ids, config.dtype)
    return held_out_inits(model, n, config.seed, config.dtype)


__all__ = ["DistillConfig", "Distiller", "DistilledSet", "DistillError", "History",
           "held_out_accuracy", "evaluation_networks", "distilled_labels", "held_out_inits",
           "INIT_MODES", "OBJECTIVES", "PRETRAINED", "SAMPLED", "RESUMABLE", "option_name"]
