"""What DC, DM and KIP share: one unordered set of images, judged by the field's protocol.

Algorithm 1 learns S ordered steps of images with a learning rate for each; the methods that
came after it learn a *pool*

    S = {(x̃_j, y_j)},  ``images_per_class`` images of each class, labels class-major (fixed),

that any network can be trained on by ordinary minibatch SGD.  So they are judged the way their
papers judge them, by the field's protocol (:mod:`ddref.protocol`: K fresh networks trained on
the pool for ``field_epochs`` epochs, each tested on the whole test split), and the random-real
baseline is the same protocol on random real images of the same count.

A pool is saved as a :class:`ddref.saved.DistilledSet` of one step: images (1, N, C, H, W),
labels (N,), and lrs (1, 1) holding the protocol's learning rate (what trains on it), so the code
that reads ``lrs`` keeps working.

Every random choice (initial images, real batches, networks) is drawn from ``self.rng``, the
outer loop's generator, so checkpoints and Ctrl-C resume exactly.
"""

from __future__ import annotations

import numpy as np

from ddref import backend, data, nn, protocol
from ddref.config import DistillConfig, option_name
from ddref.evaluate import Accuracy
from ddref.objectives.base import Objective
from ddref.saved import DistilledSet

# the settings of Algorithm 1 that mean nothing for a pool method, and why
_NOT_FOR_POOLS = (
    ("steps", "learns one unordered set of images, not steps (leave it at 1)"),
    ("epochs", "learns one unordered set of images, not steps (leave it at 1)"),
    ("engine", "has no meta-gradient through an inner training"),
    ("order", "learns an unordered set"),
    ("momentum", "has no inner loop to give momentum to (its outer SGD momentum is its paper's)"),
    ("truncate", "has no inner loop to truncate"),
    ("objective", "learns sets for classification only"),
    ("init", "judges its set on fresh random networks (init random; no pre-trained networks)"),
    ("n_nets", "draws its own networks"),
    ("distill_lr", "learns no learning rates (networks train on its set at the field "
                   "protocol's lr)"),
    ("images", "learns --images-per-class images of every class"),
    ("source_dataset", "uses no pre-trained networks"),
)


def field_recipe(config, n_nets=None) -> protocol.Recipe:
    """The field protocol of a run: ``field_epochs`` epochs, ``n_nets`` networks (default the
    config's ``eval_inits``), initialised by the config's scheme, in its dtype."""
    return protocol.Recipe(epochs=config.field_epochs, n_nets=config.eval_inits if n_nets is None else n_nets,
                           init_scheme=config.init_scheme, dtype=config.dtype)


def field_accuracy(config, model, dataset, images, labels, soft_labels=None, n_nets=None) -> Accuracy:
    """Test accuracy of the field protocol (:func:`field_recipe`, seed ``config.seed``) on a
    pool: images (…, C, H, W) flattened to (N, C, H, W), labels (N,), optional soft labels
    (…, K).  What a run reports and what :func:`ddref.distill.held_out_accuracy` reproduces."""
    shape = tuple(images.shape[-3:])
    images = backend.to_numpy(images).reshape((-1,) + shape)
    if soft_labels is not None:
        soft_labels = backend.to_numpy(soft_labels).reshape(len(images), -1)
    return protocol.evaluate(model, dataset, images, labels, field_recipe(config, n_nets),
                             seed=config.seed, soft_labels=soft_labels).accuracy


def class_major_labels(num_classes, images_per_class):
    """[0,…,0, 1,…,1, …]: ``images_per_class`` images of each class."""
    return np.repeat(np.arange(num_classes), images_per_class)


class PoolObjective(Objective):
    """Base class of DC, DM and KIP: the learned array ``x`` (1, N, C, H, W) started from random
    real images of each image's class, the field protocol as the accuracy."""

    paper = {}              # the method's PAPER dict (ddref.methods.*)
    citation = ""
    models = ("mlp", "lenet", "convnet", "convnet3")       # models the method supports
    optimiser = "sgd"

    def __init__(self, config, dataset, rng, progress=True):
        super().__init__(config, dataset, rng, progress)
        k = dataset.num_classes
        self.model = nn.build_model(config.model, dataset.image_shape, k, **config.model_options())
        data.check_finite(dataset.x_train, f"the {dataset.name} training images")
        self.x_train = np.asarray(dataset.x_train, dtype=config.dtype)
        self.y_train = np.asarray(dataset.y_train)
        self.by_class = [np.flatnonzero(self.y_train == c) for c in range(k)]
        self.labels = class_major_labels(k, config.images_per_class)
        self.sgd_momentum = self.paper.get("momentum_images", self.sgd_momentum)
        self.theta0 = None          # no fixed network: read by code shared with Algorithm 1
        self.pools = None
        short = [c for c in range(k) if len(self.by_class[c]) < config.images_per_class]
        if short:
            c = short[0]
            raise ValueError(f"--images-per-class {config.images_per_class} is more than the "
                             f"{len(self.by_class[c])} training images of class {c} in "
                             f"{dataset.name}, which the set starts from; ask for fewer.")

    @classmethod
    def check_config(cls, config):
        """Refuse, one sentence each, the options of Algorithm 1 that mean nothing here."""
        defaults = DistillConfig.for_method(cls.name)
        for name, why in _NOT_FOR_POOLS + cls.more_refusals(config):
            if getattr(config, name) != getattr(defaults, name):
                raise ValueError(f"{option_name(name)} {getattr(config, name)!r} does not apply to "
                                 f"--method {cls.name}, which {why}; leave it out "
                                 f"(DistillConfig.for_method({cls.name!r}) sets its defaults).")
        if config.model not in cls.models:
            raise ValueError(f"--model {config.model} is not one --method {cls.name} supports; "
                             f"choose one of {', '.join(cls.models)}.")

    @classmethod
    def more_refusals(cls, config):
        """(field, why) pairs a subclass refuses besides :data:`_NOT_FOR_POOLS`."""
        return (("betas", "updates its images by SGD with momentum, not Adam"),
                ("learn_labels", "learns the images only"))

    # -- what is learned ---------------------------------------------------------------------

    def real_images(self, per_class):
        """Up to ``per_class`` distinct random real images of each class (fewer when a class
        has fewer), drawn from ``self.rng``: (images (M, C, H, W) on the device, labels (M,))."""
        picks = [self.rng.choice(idx, size=min(per_class, len(idx)), replace=False)
                 for idx in self.by_class]
        idx = np.concatenate(picks)
        return backend.asarray(self.x_train[idx]), self.y_train[idx]

    def initial(self):
        """The images start as random real images of their class (DM's and KIP's default,
        one of DC's two options), drawn without replacement from ``self.rng``."""
        ipc = self.config.images_per_class
        picks = np.concatenate([self.rng.choice(idx, size=ipc, replace=False) for idx in self.by_class])
        return {"x": backend.asarray(self.x_train[picks][None], dtype=self.config.dtype)}

    def images(self, learned):
        """The pool's images (N, C, H, W)."""
        return learned["x"][0]

    # -- judging and saving ----------------------------------------------------------------------

    def soft_labels(self, learned):
        """Targets to train on instead of the hard labels, (1, N, K), or None."""
        return None

    def accuracy(self, learned, n_inits=None) -> Accuracy:
        """The field protocol on the set (``n_inits`` networks, default ``eval_inits``)."""
        return field_accuracy(self.config, self.model, self.dataset, learned["x"], self.labels,
                              self.soft_labels(learned), n_inits)

    def random_real_accuracy(self, n_draws=10) -> Accuracy:
        """The field protocol on ``n_draws`` draws of random real images, as many of each class
        as the set has; draw d is made by generator (seed, d) and trained as one network
        (field seed ``seed + d``), so the spread is over draws and networks together."""
        cfg, values = self.config, []
        for d in range(n_draws):
            rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, d, 0xBA5E]))
            idx = np.concatenate([rng.choice(c, size=cfg.images_per_class, replace=False)
                                  for c in self.by_class])
            result = protocol.evaluate(self.model, self.dataset, self.x_train[idx], self.y_train[idx],
                                       field_recipe(cfg, 1), seed=cfg.seed + d)
            values += list(result.accuracy.values)
        return Accuracy.of(values)

    def distilled_set(self, learned) -> DistilledSet:
        soft = self.soft_labels(learned)
        return DistilledSet(images=backend.to_numpy(learned["x"]), labels=self.labels,
                            lrs=np.full((1, 1), field_recipe(self.config).lr),
                            mean=np.asarray(self.dataset.mean), std=np.asarray(self.dataset.std),
                            config=self.config.to_dict(), classes=tuple(self.dataset.classes),
                            soft_labels=None if soft is None else backend.to_numpy(soft))
