"""Algorithm 1: learn distilled images x̃ and learning rates η̃.

    for each outer iteration:
        θ0 ← the fixed initialisation, or fresh draws θ0 ~ p(θ0)           (init mode)
        θ_T ← E epochs × S steps of  θ ← θ − η̃[e, s] ∇θ ℓ(x̃[s], θ)          (ddref.unroll)
        L ← ℓ_obj(x_real, θ_T) on a random real batch                        (objective)
        (x̃, raw η̃) ← Adam step along ∂L/∂(x̃, raw η̃)                        (ddref.hypergrad)

A run is driven by one :class:`DistillConfig`.  :class:`Distiller` owns the state (x̃,
raw η̃, Adam moments, the random generator, the iteration count and the history), writes
checkpoints atomically and resumes from them exactly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

import ddref
from ddref import backend, data, hypergrad, labels, nn, reversible
from ddref.evaluate import Accuracy, Adam, TrainingDiverged, evaluate_distilled, held_out_inits
from ddref.losses import attack_targets, one_hot
from ddref.saved import (DistilledSet, SavedFileError, atomic_savez, json_field, load_npz,
                         json_safe)
from ddref.unroll import inverse_softplus, softplus

INIT_MODES = ("fixed", "random", "fixed-pretrained", "random-pretrained")
PRETRAINED = ("fixed-pretrained", "random-pretrained")
SAMPLED = ("random", "random-pretrained")     # modes that draw --n-nets networks every iteration
OBJECTIVES = ("classify", "attack")


# an outer loss above this many times chance level (log K) means the inner training diverged
DIVERGENCE_FACTOR = 100


class DistillError(RuntimeError):
    """A run that cannot go on (a diverging learning rate, a NaN, a bad checkpoint)."""


@dataclass
class DistillConfig:
    """Every setting of a distillation run.  Defaults: the main job of the README."""

    dataset: str = "digits"
    model: str = "mlp"
    init: str = "fixed"              # 'fixed': one θ0 for the whole run; 'random': θ0 ~ p(θ0) each iteration
    n_nets: int = 1                  # random init: networks per iteration, meta-gradients averaged
    steps: int = 10                  # S: groups of distilled images, one per gradient step
    epochs: int = 3                  # E: passes over the S steps
    images_per_class: int = 1        # distilled images of each class in every step
    distill_lr: float = 0.02         # initial η̃ for every (epoch, step)
    lr: float = 0.01                 # outer Adam learning rate
    betas: tuple = (0.5, 0.999)      # outer Adam betas, as in the original code
    lr_decay: float = 0.5            # outer lr multiplied by this ...
    decay_every: int = 400           # ... every this many iterations (0: never)
    batch_size: int = 512            # real images per outer iteration
    iterations: int = 1000
    engine: str = "backgrad"         # 'naive' | 'backgrad' | 'checkpoint' | 'reverse'
    objective: str = "classify"      # 'classify' | 'attack'
    source_class: int = 0            # attack: make this class (K) ...
    target_class: int = 1            # ... be read as this one (T)
    init_scheme: str = "xavier"
    init_scale: float = 1.0
    dtype: str = "float32"
    seed: int = 0
    eval_every: int = 100            # test accuracy for the curves (0: only at the end)
    eval_inits: int = 10             # random init: held-out initialisations for the final accuracy
    checkpoint_every: int = 100
    order: str = "learned"           # 'learned': steps in their order; 'random': a new order every iteration
    momentum: float = 0.0            # β of the inner loop: v ← βv − η̃g, θ ← θ + v (0: plain GD)
    truncate: int = 0                # meta-gradient through the last K inner steps only (0: all)
    # pre-trained initialisations (§3.6): pools of networks trained on source_dataset
    source_dataset: str = ""         # pre-trained modes: data set the pool is trained on ('' = dataset)
    pool_nets: int = 20              # pre-trained modes: networks in the training pool
    pretrained_net: int = 0          # fixed-pretrained: which network of the training pool is θ0
    pretrain_epochs: int = 10        # pool training: Adam epochs on the source training split
    pretrain_lr: float = 1e-3        # pool training: Adam learning rate
    train_pool: str = ""             # recorded by the run: training pool file and checksum
    eval_pool: str = ""              # recorded by the run: held-out pool file and checksum
    # beyond the paper (ddref.labels): learned soft labels, any number of images per step
    learn_labels: bool = False       # learn a label for every image (ddref.labels, --label-form)
    images: int = 0                  # images per step, classes assigned round-robin (0: images_per_class × K)
    label_lr: float = 0.1            # learned labels: outer Adam lr of the label vectors (decays with --lr)
    label_init: float = 0.9          # learned labels: initial probability of the assigned class
    label_form: str = "softmax"      # learned labels: 'softmax' (t = softmax(z)) or 'free' (t = z)

    @property
    def num_inner_steps(self):
        return self.steps * self.epochs

    def validate(self):
        """Raise ValueError with one sentence, naming the command-line option, for a setting
        that cannot work; checked before anything is loaded or computed."""
        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name), f.default)
        checks = [
            (_known_dataset(self.dataset), "dataset", "must name a data set listed by `ddref datasets`"),
            (self.model in nn.MODELS, "model", f"must be one of {', '.join(nn.MODELS)}"),
            (self.init in INIT_MODES, "init", f"must be one of {', '.join(INIT_MODES)}"),
            (self.engine in reversible.ENGINES, "engine", f"must be one of {', '.join(reversible.ENGINES)}"),
            (self.objective in OBJECTIVES, "objective", f"must be one of {', '.join(OBJECTIVES)}"),
            (self.init_scheme in nn.INIT_SCHEMES, "init_scheme", f"must be one of {', '.join(nn.INIT_SCHEMES)}"),
            (self.dtype in ("float32", "float64"), "dtype", "must be float32 or float64"),
            (self.order in ("learned", "random"), "order", "must be learned or random"),
            (self.source_class != self.target_class or self.objective != "attack", "target_class",
             "must differ from --source-class for an attack"),
        ]
        for name in ("steps", "epochs", "images_per_class", "batch_size", "n_nets", "eval_inits",
                     "pool_nets", "pretrain_epochs"):
            checks.append((getattr(self, name) >= 1, name, "must be at least 1"))
        for name in ("iterations", "decay_every", "eval_every", "checkpoint_every",
                     "source_class", "target_class"):
            checks.append((getattr(self, name) >= 0, name, "must be 0 or more"))
        checks += [
            (self.n_nets == 1 or self.init.startswith("random"), "n_nets",
             "only applies to a random init (--init random); leave it at 1"),
            (0 <= self.seed < 2 ** 63, "seed", "must be an integer in 0 … 2**63 − 1"),
            (0 < self.distill_lr < math.inf, "distill_lr", "must be a positive finite number"),
            (0 < self.lr < math.inf, "lr", "(the outer Adam learning rate) must be a positive finite number"),
            (0 < self.lr_decay <= 1, "lr_decay", "must be in (0, 1]: the outer learning rate is "
                                                 "multiplied by it every --decay-every iterations"),
            (0 < self.init_scale < math.inf, "init_scale", "must be a positive finite number"),
            (0 <= self.momentum < 1, "momentum", "must be in [0, 1) (0: plain gradient descent)"),
            (0 <= self.truncate <= self.num_inner_steps, "truncate",
             f"must be between 0 (no truncation) and the {self.num_inner_steps} inner steps"),
            (len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas",
             "must be two numbers in [0, 1), e.g. --betas 0.5 0.999"),
            (self.init in PRETRAINED or not self.source_dataset, "source_dataset",
             "needs --init fixed-pretrained or random-pretrained"),
            (not self.source_dataset or _known_dataset(self.source_dataset), "source_dataset",
             "must name a data set listed by `ddref datasets`"),
            (0 < self.pretrain_lr < math.inf, "pretrain_lr", "must be a positive finite number"),
            (0 <= self.pretrained_net < self.pool_nets, "pretrained_net",
             f"must name a network of the pool, 0 … {self.pool_nets - 1}; raise --pool-nets or "
             f"lower --pretrained-net"),
            (0 < self.label_lr < math.inf, "label_lr", "must be a positive finite number"),
            (self.learn_labels or self.label_lr == DistillConfig.label_lr, "label_lr",
             "only applies with --learn-labels"),
            (0 < self.label_init < 1, "label_init", "must be a probability strictly between 0 and 1"),
            (self.learn_labels or self.label_init == DistillConfig.label_init, "label_init",
             "only applies with --learn-labels"),
            (self.label_form in labels.LABEL_FORMS, "label_form",
             f"must be one of {', '.join(labels.LABEL_FORMS)}"),
            (self.learn_labels or self.label_form == DistillConfig.label_form, "label_form",
             "only applies with --learn-labels"),
            (self.label_form == "softmax" or self.label_init == DistillConfig.label_init,
             "label_init", "only applies with --label-form softmax (free labels start as the "
                           "hard labels)"),
            (self.images >= 0, "images", "must be 0 (use --images-per-class) or a number of images"),
            (not self.images or self.images_per_class == 1, "images",
             "and --images-per-class both set the images per step: give only one of them"),
            *self._label_checks(),
        ]
        for ok, name, rule in checks:
            if not ok:
                raise ValueError(f"{option_name(name)} {rule}; got {getattr(self, name)!r}.")
        reversible.check_options(self.engine, self.momentum, self.truncate, "last",
                                 self.num_inner_steps)
        return self

    def _label_checks(self):
        """Learned labels get their gradient from the naive and backgrad engines of the plain
        inner loop, and are evaluated by plain training from fixed or random θ0."""
        if not self.learn_labels:
            return []
        return [
            (self.engine in hypergrad.ENGINES and not self.momentum and not self.truncate,
             "learn_labels", "needs --engine naive or backgrad, without --momentum or --truncate"),
            (self.init in ("fixed", "random"), "learn_labels", "needs --init fixed or random"),
            (self.objective == "classify", "learn_labels", "needs --objective classify"),
        ]

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}; known keys: {sorted(known)}.")
        values = dict(values)
        if isinstance(values.get("betas"), (list, tuple)):
            values["betas"] = tuple(values["betas"])
        return cls(**values)


def _known_dataset(name):
    try:
        data._entry(name)
    except data.DataError:
        return False
    return True


def option_name(field_name):
    """The command-line option of a config field: ``lr_decay`` → ``--lr-decay``."""
    return "--" + field_name.replace("_", "-")


def _check_type(name, value, default):
    """A config value must have its default's type (an int may stand for a float)."""
    if isinstance(default, bool) or isinstance(value, bool):
        ok = isinstance(value, bool) == isinstance(default, bool)
    elif isinstance(default, int):
        ok = isinstance(value, numbers.Integral)
    elif isinstance(default, float):
        ok = isinstance(value, numbers.Real)
    elif isinstance(default, tuple):
        ok = isinstance(value, tuple) and all(isinstance(v, numbers.Real) for v in value)
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ValueError(f"{option_name(name)} must be {type(default).__name__}, got {value!r}.")


def distilled_labels(num_classes, images_per_class):
    """The fixed labels of every step: class-major, [0,…,0, 1,…,1, …] as in the original code."""
    return np.repeat(np.arange(num_classes), images_per_class)


# ---------------------------------------------------------------------------- the run


@dataclass
class History:
    iterations: list = field(default_factory=list)      # outer iteration of each loss
    losses: list = field(default_factory=list)
    eval_iterations: list = field(default_factory=list)
    eval_accuracies: list = field(default_factory=list)
    seconds: float = 0.0


class Distiller:
    """State and loop of Algorithm 1.

        distiller = Distiller(DistillConfig(steps=1, epochs=3))
        distiller.run()
        result = distiller.distilled_set()
    """

    def __init__(self, config: DistillConfig, dataset=None, progress=True):
        self.config = config.validate()
        self.dataset = dataset if dataset is not None else data.load(config.dataset, dtype=config.dtype)
        self.model = nn.build_model(config.model, self.dataset.image_shape, self.dataset.num_classes)
        self.progress = progress
        self.rng = backend.rng(config.seed)
        dtype = config.dtype
        data.check_finite(self.dataset.x_train, f"the {self.dataset.name} training images")
        self.x_train = backend.asarray(self.dataset.x_train, dtype=dtype)
        k = self.dataset.num_classes
        self.labels = labels.assigned_labels(k, config.images or config.images_per_class * k)
        self.targets = one_hot(self.labels, k, dtype)
        self.real_targets_of = self._make_real_targets()
        self._check_fits_the_data()
        for name in ("source_class", "target_class"):
            if config.objective == "attack" and getattr(config, name) >= self.dataset.num_classes:
                raise ValueError(f"{option_name(name)} {getattr(config, name)} is not a class of "
                                 f"{self.dataset.name} (0 … {self.dataset.num_classes - 1}).")

        c, h, w = self.dataset.image_shape
        self.pools = self._load_pools() if config.init in PRETRAINED else None
        self.theta0 = None
        if config.init == "fixed":
            self.theta0 = self.model.init(self.rng, dtype, config.init_scheme, config.init_scale)
        elif config.init == "fixed-pretrained":
            self.theta0 = self.pools.train.network(config.pretrained_net, dtype)
        self.x = backend.normal(self.rng, (config.steps, len(self.labels), c, h, w), 1.0, dtype)
        self.raw_lrs = backend.asarray(
            np.full((config.epochs, config.steps), inverse_softplus(config.distill_lr)), dtype=dtype)
        self.label_logits = (labels.initial_logits(self.labels, k, config.steps, dtype,
                                                   config.label_init, config.label_form)
                             if config.learn_labels else None)
        self.adam = Adam(self.learned(), lr=config.lr, betas=config.betas)
        self.iteration = 0
        self.history = History()

    def _check_fits_the_data(self):
        cfg, y = self.config, self.dataset.y_train
        if cfg.batch_size > len(y):
            raise ValueError(f"--batch-size {cfg.batch_size} is more than the {len(y)} training "
                             f"images of {self.dataset.name}; use at most {len(y)}.")
        counts = np.bincount(y, minlength=self.dataset.num_classes)
        wanted = np.bincount(self.labels, minlength=self.dataset.num_classes)
        if (wanted > counts).any():
            c = int(np.argmax(wanted - counts))
            option = (f"--images {cfg.images}" if cfg.images
                      else f"--images-per-class {cfg.images_per_class}")
            raise ValueError(f"{option} asks for {wanted[c]} images of class {c}, more than its "
                             f"{counts[c]} training images in {self.dataset.name}, which the "
                             f"random-real baseline draws from; ask for fewer.")

    # -- one outer iteration -------------------------------------------------------------

    def _make_real_targets(self):
        cfg, k = self.config, self.dataset.num_classes
        if cfg.objective == "attack":
            return lambda y: attack_targets(y, k, cfg.source_class, cfg.target_class, cfg.dtype)
        return lambda y: one_hot(y, k, cfg.dtype)

    def _load_pools(self):
        """The training and held-out pools (trained now if absent), recorded in the config."""
        from ddref import pretrained

        pools = pretrained.pools_for(self.config, self.dataset, progress=self.progress, log=tqdm.write)
        self.config.train_pool = pretrained.pool_label(pools.train)
        self.config.eval_pool = pretrained.pool_label(pools.held_out)
        return pools

    def sample_theta0(self):
        cfg = self.config
        if cfg.init in ("fixed", "fixed-pretrained"):
            return self.theta0
        if cfg.init == "random-pretrained":
            return self.pools.train.network(int(self.rng.integers(len(self.pools.train))), cfg.dtype)
        return self.model.init(self.rng, cfg.dtype, cfg.init_scheme, cfg.init_scale)

    def sample_real_batch(self):
        n = len(self.dataset.y_train)
        idx = self.rng.choice(n, size=min(self.config.batch_size, n), replace=False)
        return self.x_train[backend.asarray(idx)], self.real_targets_of(self.dataset.y_train[idx])

    def outer_lr(self):
        cfg = self.config
        if not cfg.decay_every:
            return cfg.lr
        return cfg.lr * cfg.lr_decay ** (self.iteration // cfg.decay_every)

    def meta_gradient(self):
        """(outer loss, ∂L/∂x̃, ∂L/∂raw η̃), averaged over the ``n_nets`` networks."""
        loss, grads = self.meta_gradients()
        return loss, grads["x"], grads["raw_lrs"]

    def meta_gradient_in_order(self):
        """:meth:`meta_gradient` with the steps in the configured order."""
        loss, grads = self.meta_gradients_in_order()
        return loss, grads["x"], grads["raw_lrs"]

    def meta_gradients(self):
        """The outer loss and its gradient with respect to everything :meth:`learned` (a dict
        keyed like it), averaged over the ``n_nets`` networks."""
        cfg = self.config
        n_nets = cfg.n_nets if cfg.init in SAMPLED else 1
        targets = self.inner_targets()
        theta0s, x_reals, real_targets = [], [], []
        for _ in range(n_nets):                  # same draws, same order as one net at a time
            theta0s.append(self.sample_theta0())
            x_real, batch_targets = self.sample_real_batch()
            x_reals.append(x_real)
            real_targets.append(batch_targets)
        if cfg.momentum or cfg.truncate or cfg.engine not in hypergrad.ENGINES:
            meta = [reversible.meta_gradient(cfg.engine, self.model.apply, theta0, self.x,
                                             self.targets, self.raw_lrs, x_real, batch_targets,
                                             momentum=cfg.momentum, truncate=cfg.truncate)
                    for theta0, x_real, batch_targets in zip(theta0s, x_reals, real_targets)]
        elif not cfg.learn_labels:
            meta = [hypergrad.mean_meta_gradient(cfg.engine, self.model.apply, theta0s, self.x,
                                                 self.targets, self.raw_lrs, x_reals, real_targets)]
        else:   # learned labels: one network at a time, with the gradient w.r.t. the targets
            meta = [hypergrad.meta_gradient(cfg.engine, self.model.apply, theta0, self.x, targets,
                                            self.raw_lrs, x_real, batch_targets, wrt_targets=True)
                    for theta0, x_real, batch_targets in zip(theta0s, x_reals, real_targets)]
        grads = {"x": sum(m.grad_x for m in meta) / len(meta),
                 "raw_lrs": sum(m.grad_raw_lrs for m in meta) / len(meta)}
        if cfg.learn_labels:   # through t = softmax(z) (or t = z) to the label vectors z
            grads["label_logits"] = labels.logits_gradient(
                targets, sum(m.grad_targets for m in meta) / len(meta), cfg.label_form)
        return sum(m.loss for m in meta) / len(meta), grads

    def learned(self):
        """What the outer loop learns: x̃, raw η̃ and, with learned labels, the label logits."""
        values = {"x": self.x, "raw_lrs": self.raw_lrs}
        if self.label_logits is not None:
            values["label_logits"] = self.label_logits
        return values

    def inner_targets(self):
        """The targets of the inner loop: the fixed one-hot labels (n, K) shared by every step,
        or the learned labels softmax(z) — or z itself for --label-form free — (S, n, K)."""
        if self.label_logits is None:
            return self.targets
        return labels.soft_targets(self.label_logits, self.config.label_form)

    def meta_gradients_in_order(self):
        """:meth:`meta_gradients` with the steps in their order, or — with ``order='random'`` — in
        a fresh random order (the rate η̃[e, s] stays with position s), mapped back to x̃."""
        if self.config.order == "learned":
            return self.meta_gradients()
        order = backend.asarray(self.rng.permutation(self.config.steps))
        images, logits = self.x, self.label_logits
        self.x = images[order]
        if logits is not None:               # each image keeps its own label
            self.label_logits = logits[order]
        try:
            loss, grads = self.meta_gradients()
        finally:
            self.x, self.label_logits = images, logits
        for k in ("x", "label_logits"):
            if k in grads:
                permuted, grads[k] = grads[k], backend.xp().empty_like(grads[k])
                grads[k][order] = permuted
        return loss, grads

    def step(self):
        loss, grads = self.meta_gradients_in_order()
        self._check_healthy(loss, *grads.values())
        self.adam.lr = self.outer_lr()
        updated = self.adam.step(self.learned(), grads)
        self.x, self.raw_lrs = updated["x"], updated["raw_lrs"]
        if self.label_logits is not None:
            # Adam's step is lr · m̂/(√v̂ + ε): scaling it by label_lr / lr is Adam with the
            # learning rate label_lr (decayed on the same schedule) for the logits
            step = updated["label_logits"] - self.label_logits
            self.label_logits = self.label_logits + (self.config.label_lr / self.config.lr) * step
        self.iteration += 1
        self.history.iterations.append(self.iteration)
        self.history.losses.append(loss)
        return loss

    def _check_healthy(self, loss, *grads):
        """Stop with the cause named when the inner training has diverged: a NaN/inf, or an
        outer loss far above chance level (log K, the loss of a uniform guess)."""
        xp = backend.xp()
        finite = math.isfinite(loss) and all(bool(xp.isfinite(g).all()) for g in grads)
        chance = math.log(self.dataset.num_classes)
        if finite and loss <= DIVERGENCE_FACTOR * chance:
            return
        lrs = backend.to_numpy(self.lrs())
        what = "became NaN/inf" if not finite else f"is {loss:.3g}, far above chance level {chance:.2f}"
        raise DistillError(
            f"the outer loss or its gradient {what} at iteration {self.iteration + 1} "
            f"(learned learning rates now range {lrs.min():.3g}…{lrs.max():.3g}): the inner "
            f"training diverged")

    def lrs(self):
        """The learning rates η̃ = softplus(raw), shape (epochs, steps)."""
        return softplus(self.raw_lrs)

    # -- the loop --------------------------------------------------------------------------

    def run(self, iterations=None, checkpoint_path=None):
        """Run until ``iterations`` (default: the config's) outer iterations are done.

        Checkpoints every ``checkpoint_every`` iterations, at the end, on Ctrl-C and when the
        inner training diverges.  An iteration is all or nothing: when it is interrupted (or
        diverges) the state is rolled back to its start — random generator included — before
        the checkpoint is written, so a resumed run repeats exactly the iterations an
        uninterrupted one would have done.
        """
        total = self.config.iterations if iterations is None else iterations
        bar = tqdm(total=total, initial=self.iteration, desc="distill", unit="it",
                   disable=not self.progress, dynamic_ncols=True)
        start_of_iteration = self._snapshot()
        try:
            if self.iteration == 0 and not self.history.eval_iterations:
                self.record_accuracy()  # the starting point of the accuracy curve
            while self.iteration < total:
                start_of_iteration = self._snapshot()
                self._iterate(bar, checkpoint_path)
            if self.history.eval_iterations[-1:] != [self.iteration]:
                self.record_accuracy()  # the end point of the accuracy curve
        except KeyboardInterrupt:
            self._restore(start_of_iteration)
            if checkpoint_path:
                self._save_uninterrupted(checkpoint_path)
                bar.write(f"interrupted; iteration {self.iteration} is complete and saved to "
                          f"{checkpoint_path} (continue with --resume).")
            raise
        except DistillError as error:
            self._restore(start_of_iteration)
            if checkpoint_path:
                self._save_uninterrupted(checkpoint_path)
                out = Path(checkpoint_path).parent
                raise DistillError(
                    f"{error}. The last good state (iteration {self.iteration}) is saved in "
                    f"{checkpoint_path}: continue it with a smaller outer learning rate, e.g. "
                    f"`ddref distill --resume --out {out} --lr {self.outer_lr() / 4:g}`, or start "
                    f"again with a smaller --distill-lr.") from None
            raise DistillError(f"{error}; lower --distill-lr or the outer --lr.") from None
        finally:
            bar.close()
        if checkpoint_path:
            self.save_checkpoint(checkpoint_path)
        return self

    def _iterate(self, bar, checkpoint_path):
        """One outer iteration with its bookkeeping: step, progress, curve point, checkpoint."""
        start = time.perf_counter()
        loss = self.step()
        self.history.seconds += time.perf_counter() - start
        lrs = backend.to_numpy(self.lrs())
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lrs.min():.3f}…{lrs.max():.3f}")
        cfg = self.config
        if cfg.eval_every and self.iteration % cfg.eval_every == 0:
            self.record_accuracy()
        if checkpoint_path and cfg.checkpoint_every and self.iteration % cfg.checkpoint_every == 0:
            self.save_checkpoint(checkpoint_path)

    def _snapshot(self):
        """Everything an iteration changes.  Arrays are never modified in place (every update
        makes new arrays), so holding references is enough; the lists are copied."""
        return {"iteration": self.iteration, "rng": self.rng.bit_generator.state,
                "x": self.x, "raw_lrs": self.raw_lrs, "label_logits": self.label_logits,
                "adam": self.adam.state(),
                "history": {k: list(v) if isinstance(v, list) else v
                            for k, v in dataclasses.asdict(self.history).items()}}

    def _restore(self, snapshot):
        self.iteration = snapshot["iteration"]
        self.rng.bit_generator.state = snapshot["rng"]
        self.x, self.raw_lrs = snapshot["x"], snapshot["raw_lrs"]
        self.label_logits = snapshot["label_logits"]
        self.adam.load_state(snapshot["adam"])
        self.history = History(**snapshot["history"])

    def _save_uninterrupted(self, path):
        """Write a checkpoint with Ctrl-C held back, so a second Ctrl-C cannot cut it short."""
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if _main_thread() else None
        try:
            self.save_checkpoint(path)
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)

    def record_accuracy(self, n_inits=3):
        """Test accuracy now, for the curves (random init: mean over a few held-out inits)."""
        try:
            acc = self.accuracy(n_inits=n_inits)
        except TrainingDiverged as error:
            raise DistillError(f"evaluating the distilled set at iteration {self.iteration}: {error}") from None
        self.history.eval_iterations.append(self.iteration)
        self.history.eval_accuracies.append(acc.mean)
        return acc

    def accuracy(self, n_inits=None) -> Accuracy:
        """Test accuracy of networks trained on the current distilled set."""
        return evaluate_distilled(self.model, self.dataset, self.x, self.labels, self.lrs(),
                                  momentum=self.config.momentum,
                                  inits=self.evaluation_networks(n_inits),
                                  soft_labels=self.soft_labels())

    def soft_labels(self):
        """The learned labels as training targets (S, n, K), or None with fixed labels."""
        return (None if self.label_logits is None
                else labels.soft_targets(self.label_logits, self.config.label_form))

    def evaluation_networks(self, n=None):
        """The θ0 of the networks a finished set is judged on: the fixed θ0 (fixed and
        fixed-pretrained), networks of the held-out pool (random-pretrained), or held-out
        random initialisations (random)."""
        cfg = self.config
        n = cfg.eval_inits if n is None else n
        if self.theta0 is not None:
            return [self.theta0]
        if cfg.init == "random-pretrained":
            return self.pools.held_out.networks(range(min(n, len(self.pools.held_out))), cfg.dtype)
        return held_out_inits(self.model, n, cfg.seed, cfg.dtype)

    def distilled_set(self) -> DistilledSet:
        theta0 = None if self.theta0 is None else {k: backend.to_numpy(v) for k, v in self.theta0.items()}
        return DistilledSet(images=backend.to_numpy(self.x), labels=self.labels,
                            lrs=backend.to_numpy(self.lrs()), mean=np.asarray(self.dataset.mean),
                            std=np.asarray(self.dataset.std), config=self.config.to_dict(),
                            theta0=theta0, classes=tuple(self.dataset.classes),
                            soft_labels=(None if self.label_logits is None
                                         else backend.to_numpy(self.soft_labels())))

    # -- checkpoints -----------------------------------------------------------------------

    def save_checkpoint(self, path):
        adam = self.adam.state()
        arrays = {
            "config": np.array(json.dumps(self.config.to_dict())),
            "iteration": np.array(self.iteration),
            "rng_state": np.array(json.dumps(self.rng.bit_generator.state)),
            "x": backend.to_numpy(self.x), "raw_lrs": backend.to_numpy(self.raw_lrs),
            "adam_t": np.array(adam["t"]), "adam_lr": np.array(adam["lr"]),
            "history": np.array(json.dumps(json_safe(dataclasses.asdict(self.history)))),
            "version": np.array(ddref.__version__),
        }
        for k, value in self.learned().items():
            arrays[k] = backend.to_numpy(value)
            arrays[f"adam_m/{k}"] = backend.to_numpy(adam["m"][k])
            arrays[f"adam_v/{k}"] = backend.to_numpy(adam["v"][k])
        for k, v in (self.theta0 or {}).items():
            arrays[f"theta0/{k}"] = backend.to_numpy(v)
        atomic_savez(path, arrays)

    @classmethod
    def from_checkpoint(cls, path, dataset=None, progress=True, changes=None):
        """Rebuild a Distiller exactly as it was when ``path`` was written.

        ``changes`` maps config fields to new values; only the fields in
        :data:`RESUMABLE` may differ from the checkpoint's (a value equal to the saved one is
        always accepted), anything else is refused with one sentence.
        """
        arrays = load_npz(path, "checkpoint")
        needed = ("config", "iteration", "rng_state", "x", "raw_lrs", "adam_t", "adam_lr",
                  "history", *(f"adam_{m}/{k}" for m in "mv" for k in ("x", "raw_lrs")))
        missing = [key for key in needed if key not in arrays]
        if missing:
            raise DistillError(f"{path} is not a ddref checkpoint (it lacks {', '.join(missing)}); "
                               f"start a new run with --force.")
        try:
            config = DistillConfig.from_dict(json_field(arrays, "config", path, "checkpoint")).validate()
        except (TypeError, ValueError) as error:
            raise DistillError(f"{path} holds an unusable config ({error}); start a new run "
                               f"with --force.") from None
        config = _apply_resume_changes(config, changes or {}, path)
        distiller = cls(config, dataset=dataset, progress=progress)
        distiller._load_state(arrays, path)
        return distiller

    def _load_state(self, arrays, path):
        """Put the arrays of a checkpoint in place, after checking they fit this run."""
        def want(key, shape):
            array = arrays[key]
            if array.shape != tuple(shape) or array.dtype.kind != "f" or not np.isfinite(array).all():
                raise DistillError(f"{path} is damaged: {key} has shape {array.shape} and type "
                                   f"{array.dtype} (want finite floats of shape {tuple(shape)}); "
                                   f"start a new run with --force.")
            return backend.asarray(array, dtype=dtype)

        dtype = self.config.dtype
        iteration = int(arrays["iteration"])
        if not 0 <= iteration:
            raise DistillError(f"{path} is damaged (iteration {iteration}); start a new run with --force.")
        self.iteration = iteration
        try:
            self.rng.bit_generator.state = json_field(arrays, "rng_state", path, "checkpoint")
        except (TypeError, ValueError, KeyError):
            raise DistillError(f"{path} is damaged (its random-generator state); start a new run "
                               f"with --force.") from None
        if self.config.learn_labels and "label_logits" not in arrays:
            raise DistillError(f"{path} is damaged: a run with --learn-labels but no label logits "
                               f"saved; start a new run with --force.")
        learned = self.learned()
        self.x = want("x", self.x.shape)
        self.raw_lrs = want("raw_lrs", self.raw_lrs.shape)
        if self.label_logits is not None:
            self.label_logits = want("label_logits", self.label_logits.shape)
        self.adam.load_state({
            "t": arrays["adam_t"], "lr": arrays["adam_lr"],
            "m": {k: want(f"adam_m/{k}", v.shape) for k, v in learned.items()},
            "v": {k: want(f"adam_v/{k}", v.shape) for k, v in learned.items()}})
        if self.config.init == "fixed":
            shapes = self.model.init.shapes
            if sorted(shapes) != sorted(k.split("/", 1)[1] for k in arrays if k.startswith("theta0/")):
                raise DistillError(f"{path} is damaged: its θ0 does not fit the {self.config.model} "
                                   f"model; start a new run with --force.")
            self.theta0 = {k: want(f"theta0/{k}", shape) for k, shape in shapes.items()}
        history = json_field(arrays, "history", path, "checkpoint")
        try:
            self.history = History(**history)
        except TypeError:
            raise DistillError(f"{path} is damaged (its history); start a new run with --force.") from None


# options that may change when a run is resumed: how long it runs, the outer optimiser's
# schedule, and how often it reports; everything else defines the run and stays as it was
RESUMABLE = ("iterations", "lr", "lr_decay", "decay_every", "eval_every", "eval_inits",
             "checkpoint_every", "label_lr")


def _apply_resume_changes(config, changes, path):
    saved = config.to_dict()
    refused = [name for name, value in changes.items()
               if name not in RESUMABLE and value != saved[name]]
    if refused:
        name = refused[0]
        raise DistillError(
            f"{option_name(name)} cannot change when a run is resumed (the run in "
            f"{Path(path).parent} has {option_name(name)} {saved[name]!r}); a resume may change "
            f"only {', '.join(option_name(n) for n in RESUMABLE)} — or start a new run with --force.")
    return DistillConfig.from_dict({**saved, **changes}).validate()


def _main_thread():
    import threading

    return threading.current_thread() is threading.main_thread()


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
    model = nn.build_model(config.model, dataset.image_shape, dataset.num_classes)
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
    """Re-evaluate a saved distilled set the way the run that made it did."""
    config, dataset, model, images, lrs, theta0 = prepared_for_evaluation(distilled, dataset, source)
    check_n_inits(n_inits, config, source)
    soft = None if distilled.soft_labels is None else backend.asarray(distilled.soft_labels,
                                                                       dtype=config.dtype)
    return evaluate_distilled(model, dataset, backend.asarray(images), distilled.labels,
                              backend.asarray(lrs), theta0=theta0,
                              n_inits=n_inits or config.eval_inits, seed=config.seed,
                              momentum=config.momentum, soft_labels=soft)


__all__ = ["DistillConfig", "Distiller", "DistilledSet", "DistillError", "held_out_accuracy",
           "distilled_labels", "held_out_inits", "RESUMABLE"]
