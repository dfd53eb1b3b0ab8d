"""The field's evaluation protocol: fresh networks trained on the set as an unordered pool.

Dataset Distillation (Wang et al. 2018) evaluates a distilled set the way it was learned:
the images in their step order, with the learned learning rates η̃ (:mod:`ddref.evaluate`).
The methods that came after — DC, DSA, DM, KIP's convolutional rows, MTT, FRePo — report
another number, and this module computes it:

    for k = 1..K:   θ ~ p(θ0)  (a fresh random network)
                    train θ on the pool {(x̃ᵢ, yᵢ)} by minibatch SGD with momentum and weight
                    decay, the learning rate cut by a step, for a fixed number of epochs
                    acc_k = accuracy of θ on the whole test set
    report mean ± std of acc_1..acc_K

The recipe follows ``evaluate_synset`` of DC's code (VICO-UoE/DatasetCondensation,
``utils.py``; the same function serves DSA and DM):

* SGD, momentum μ = 0.9, weight decay λ = 5·10⁻⁴ (PyTorch's form, the decay added to the
  gradient):  g ← ∇θ ℓ + λθ,   v ← μv + g,   θ ← θ − η v;
* η = 0.01 (``lr_net``), multiplied by 0.1 once, after pass ``epochs // 2 + 1``;  DC does it
  by building a new optimiser, so the momentum buffer v restarts from zero there, and so
  does this module;
* DC's loop runs ``for ep in range(Epoch + 1)``: ``epochs + 1`` passes over the data (one
  more than the name says); kept, so that ``epochs=300`` trains as DC's 300 does;
* each pass shuffles the pool and cuts it into minibatches of 256 (the last one smaller, as
  a PyTorch DataLoader keeps it); a set of ≤ 256 images is one full batch per pass;
* mean cross-entropy on the hard labels (or on label distributions, when given);
* tested on the whole test set, K = 20 networks (``num_eval``) in DC's code.

Where this module differs, and why:

* **No augmentation.**  DC trains its MNIST rows with crop/scale/rotate augmentation and then
  for 1000 epochs; DSA and DM train every row with DSA augmentation
  (``color_crop_cutout_flip_scale_rotate``) for 1000 epochs.  Their rows therefore are not
  this protocol's numbers exactly; DC's Fashion-MNIST rows (no augmentation, 300 epochs) are.
  ``Recipe.augmentation`` records "none" so a table can say so.
* **Epochs.**  The default, 300, is DC's own default without augmentation (``main.py``,
  ``epoch_eval_train``), and what a CPU affords: DSA/DM's 1000 cost 3.3 times as much for a
  gain they attribute to augmentation.
* **Initialisation.**  ddref's models draw weights by ``Recipe.init_scheme`` (xavier, biases
  zero; γ = 1, β = 0 for instance norm); PyTorch's layers draw kaiming-uniform weights and
  uniform biases.  Instance norm makes convnet3 insensitive to its convolution weights' scale.
* **Seeds.**  DC seeds each network from the clock; here network k draws its initialisation
  and every shuffle from its own generator, made from (seed, k): the same seed gives the same
  numbers, and network k does not depend on K.
* **K** is ``Recipe.n_nets``; its default, 5, is smaller than DC's 20 to fit a CPU: on one
  core a convnet3 (width 32) network trained on 100 Fashion-MNIST-sized images for 300 epochs
  and tested on 10,000 images takes about a minute, a LeNet about 7 s
  (``benchmarks/protocol_speed.py``).

No test image is used for anything but the final score: :func:`train_networks` never sees
the data set, only the pool; :func:`evaluate` scores the trained networks afterwards
(tests/test_protocol.py checks both with a test split that refuses to be read early and one
that is poisoned).  The data set's training split is not used at all.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np
from tqdm import tqdm

from ddref import backend, fused
from ddref.evaluate import Accuracy, accuracies_on
from ddref.losses import cross_entropy, one_hot
from ddref.unroll import loss_and_grad

SOURCE = "DC evaluate_synset (VICO-UoE/DatasetCondensation utils.py)"
AUGMENTATIONS = ("none",)


@dataclass(frozen=True)
class Recipe:
    """Every parameter of the field's protocol (see the module docstring for the source of
    each default and where ddref differs)."""

    epochs: int = 300               # DC's epoch_eval_train without augmentation; passes = epochs + 1
    lr: float = 0.01                # DC's lr_net
    lr_decay: float = 0.1           # η ← 0.1 η once, after pass epochs // 2 + 1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256           # DC's batch_train
    n_nets: int = 5                 # K fresh networks (DC: num_eval = 20)
    augmentation: str = "none"      # DC on MNIST, DSA and DM augment; not implemented here
    init_scheme: str = "xavier"     # ddref's initialisation (DC: PyTorch's layer defaults)
    dtype: str = "float32"

    @property
    def passes(self) -> int:
        """Passes over the pool: DC's ``range(Epoch + 1)``."""
        return self.epochs + 1

    @property
    def decay_after(self) -> int:
        """The pass (0-based) after which η is multiplied by ``lr_decay``: DC's ``Epoch//2 + 1``."""
        return self.epochs // 2 + 1

    def lr_of_pass(self, p: int) -> float:
        """η during pass p."""
        return self.lr * (self.lr_decay if p > self.decay_after else 1.0)

    def check(self):
        """One clear ValueError naming the first option that cannot work."""
        rules = [
            (isinstance(self.epochs, int) and self.epochs >= 0, "epochs", "a whole number ≥ 0"),
            (self.lr > 0, "lr", "positive"),
            (0 < self.lr_decay <= 1, "lr_decay", "in (0, 1]"),
            (0 <= self.momentum < 1, "momentum", "in [0, 1)"),
            (self.weight_decay >= 0, "weight_decay", "≥ 0"),
            (isinstance(self.batch_size, int) and self.batch_size >= 1, "batch_size", "a whole number ≥ 1"),
            (isinstance(self.n_nets, int) and self.n_nets >= 1, "n_nets", "a whole number ≥ 1"),
            (self.augmentation in AUGMENTATIONS, "augmentation", f"one of {', '.join(AUGMENTATIONS)}"),
            (self.dtype in ("float32", "float64"), "dtype", "'float32' or 'float64'"),
        ]
        for ok, name, must in rules:
            if not ok:
                raise ValueError(f"the field protocol's {name}={getattr(self, name)!r} must be {must}.")
        return self

    def to_dict(self) -> dict:
        """The recipe as plain values for metrics.json, with what it derives and its source."""
        return {"protocol": "field", "source": SOURCE, **asdict(self), "passes": self.passes,
                "lr_decay_after_pass": self.decay_after, "momentum_reset_at_decay": True,
                "optimizer": "SGD (PyTorch form: g + λθ, v ← μv + g, θ ← θ − ηv)",
                "minibatches": "reshuffled every pass, last partial batch kept",
                "loss": "mean cross-entropy", "test": "whole test split, once, after training"}


@dataclass(frozen=True)
class FieldResult:
    """What :func:`evaluate` measured: mean ± std test accuracy over K networks, the recipe,
    the seed, the pool's size and the wall time (training, testing)."""

    accuracy: Accuracy
    recipe: Recipe
    seed: int
    n_images: int
    seconds_train: float
    seconds_test: float
    networks: tuple = field(default=(), repr=False, compare=False)   # the K trained parameter dicts

    def to_dict(self) -> dict:
        return {"protocol": "field", "mean": self.accuracy.mean, "std": self.accuracy.std,
                "n": self.accuracy.n, "values": list(self.accuracy.values), "seed": self.seed,
                "n_images": self.n_images, "seconds_train": self.seconds_train,
                "seconds_test": self.seconds_test, "recipe": self.recipe.to_dict()}


# ---------------------------------------------------------------------------- the pool


def training_targets(model, images, labels, soft_labels=None, dtype="float32"):
    """Check the pool and return (images, targets) as host arrays of ``dtype``: images
    (N, C, H, W) for ``model``, targets (N, classes) one-hot from ``labels`` (N,) or the given
    label distributions ``soft_labels`` (N, classes)."""
    images = np.asarray(backend.to_numpy(images), dtype=dtype)
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"the field protocol trains on images shaped (N, C, H, W) with N ≥ 1; got "
                         f"{images.shape}: flatten a distilled set's step axis first (x.reshape(-1, C, H, W)).")
    model.check_input(images.shape)
    if not np.isfinite(images).all():
        raise ValueError("the images to train on contain NaN or inf; check how they were made.")
    labels = np.asarray(backend.to_numpy(labels))
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be {len(images)} whole numbers, one per image; got an array "
                         f"of shape {labels.shape} and dtype {labels.dtype}.")
    if soft_labels is None:
        return images, backend.to_numpy(one_hot(labels, model.num_classes, dtype))
    soft = np.asarray(backend.to_numpy(soft_labels), dtype=dtype)
    if soft.shape != (len(images), model.num_classes) or not np.isfinite(soft).all():
        raise ValueError(f"soft_labels must be finite label distributions shaped ({len(images)}, "
                         f"{model.num_classes}); got shape {soft.shape}.")
    return images, soft


def network_rng(seed, k):
    """Network k's own generator: its initialisation, then every pass's shuffle."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(k), 0xF1E1D]))


def minibatches(rng, n, batch_size):
    """One pass: a random permutation of 0..n−1 cut into batches of ``batch_size`` (the last
    one smaller when batch_size does not divide n)."""
    order = rng.permutation(n)
    return [order[start: start + batch_size] for start in range(0, n, batch_size)]


# ---------------------------------------------------------------------------- training


def sgd_momentum_step(params, grads, velocity, lr, momentum, weight_decay):
    """PyTorch's SGD step:  g ← ∇ℓ + λθ,  v ← μv + g,  θ ← θ − ηv.  Returns (θ, v)."""
    velocity = {k: momentum * velocity[k] + grads[k] + weight_decay * params[k] for k in params}
    return {k: params[k] - lr * velocity[k] for k in params}, velocity


def train_network(model, images, targets, recipe, rng):
    """One fresh network θ ~ p(θ0) from ``rng``, trained on the pool (images, targets) by the
    recipe; the plain loop, one minibatch at a time.  Returns θ."""
    xp = backend.xp()
    params = model.init(rng, dtype=recipe.dtype, scheme=recipe.init_scheme)
    velocity = {k: xp.zeros_like(p) for k, p in params.items()}
    for p in range(recipe.passes):
        for idx in minibatches(rng, len(images), recipe.batch_size):
            x = backend.asarray(images[idx])
            t = backend.asarray(targets[idx])
            _, grads = loss_and_grad(model.apply, params, x, t, cross_entropy)
            params, velocity = sgd_momentum_step(params, grads, velocity, recipe.lr_of_pass(p),
                                                 recipe.momentum, recipe.weight_decay)
        if p == recipe.decay_after:          # DC builds a new optimiser: the momentum restarts
            velocity = {k: xp.zeros_like(v) for k, v in velocity.items()}
    return params


def _stackable(model):
    fast = fused.gradient_for(model.apply, cross_entropy)
    return fast if fast is not None and fast.stackable else None


def train_networks_stacked(model, images, targets, recipe, seed, fast=None):
    """The K networks of :func:`train_networks` trained side by side (models whose fast
    gradient stacks, the MLP): every parameter gets a leading axis K, each network draws its
    own minibatch from its own generator, and one batched computation takes all K steps.  The
    same numbers as the plain loop (tests/test_protocol.py, float64)."""
    fast = fast or _stackable(model)
    if fast is None:
        raise ValueError(f"model {model.name!r} has no stacked fast path; use train_networks.")
    xp = backend.xp()
    rngs = [network_rng(seed, k) for k in range(recipe.n_nets)]
    inits = [model.init(rng, dtype=recipe.dtype, scheme=recipe.init_scheme) for rng in rngs]
    params = {name: xp.stack([theta[name] for theta in inits]) for name in inits[0]}
    velocity = {k: xp.zeros_like(p) for k, p in params.items()}
    for p in range(recipe.passes):
        batches = list(zip(*(minibatches(rng, len(images), recipe.batch_size) for rng in rngs)))
        for idx in batches:                  # idx: one index array per network, of one size
            x = backend.asarray(np.stack([images[i] for i in idx]))        # (K, b, C, H, W)
            t = backend.asarray(np.stack([targets[i] for i in idx]))       # (K, b, classes)
            _, grads = fast.value_and_grad(params, x, t)                   # ∇ of Σ_k ℓ_k
            params, velocity = sgd_momentum_step(params, grads, velocity, recipe.lr_of_pass(p),
                                                 recipe.momentum, recipe.weight_decay)
        if p == recipe.decay_after:
            velocity = {k: xp.zeros_like(v) for k, v in velocity.items()}
    return [{name: params[name][k] for name in params} for k in range(recipe.n_nets)]


def train_networks(model, images, targets, recipe, seed=0, stacked=None, progress=False):
    """K = ``recipe.n_nets`` fresh networks trained on the pool; network k from
    :func:`network_rng` (seed, k).  ``stacked``: train them side by side (None: when the
    model allows it).  Sees only the pool — never a data set."""
    fast = _stackable(model)
    if stacked is None:
        stacked = fast is not None and recipe.n_nets > 1
    if stacked:
        return train_networks_stacked(model, images, targets, recipe, seed, fast)
    bar = tqdm(range(recipe.n_nets), desc=f"field protocol, {model.name}", unit="net",
               disable=not progress)
    return [train_network(model, images, targets, recipe, network_rng(seed, k)) for k in bar]


# ---------------------------------------------------------------------------- the protocol


def evaluate(model, dataset, images, labels, recipe=None, seed=0, soft_labels=None,
             stacked=None, progress=False, diverged="raise"):
    """The field's protocol: K fresh networks trained on (images, labels) as an unordered
    pool, then each tested once on the whole test split of ``dataset``.

    images : (N, C, H, W), e.g. a distilled set (S, n, C, H, W) reshaped to (S·n, C, H, W)
    labels : (N,) integer labels; ``soft_labels`` (N, classes) to train on distributions
    recipe : :class:`Recipe` (default ``Recipe()``)
    diverged : "raise" (a network with NaN outputs is an error) or "nan" (it scores NaN)

    Returns a :class:`FieldResult` (``to_dict()`` for metrics.json)."""
    recipe = (recipe or Recipe()).check()
    images, targets = training_targets(model, images, labels, soft_labels, recipe.dtype)
    start = time.perf_counter()
    nets = train_networks(model, images, targets, recipe, seed, stacked, progress)
    trained = time.perf_counter()
    scores = accuracies_on(model.apply, nets, dataset.x_test, dataset.y_test, diverged=diverged)
    tested = time.perf_counter()
    return FieldResult(Accuracy.of(scores), recipe, int(seed), len(images),
                       trained - start, tested - trained, tuple(nets))
