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
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

import ddref
from ddref import backend, data, hypergrad, nn
from ddref.evaluate import Accuracy, Adam, evaluate_distilled, held_out_inits
from ddref.losses import attack_targets, one_hot
from ddref.unroll import inverse_softplus, softplus

INIT_MODES = ("fixed", "random")
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
    engine: str = "backgrad"         # 'naive' | 'backgrad'
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

    @property
    def num_inner_steps(self):
        return self.steps * self.epochs

    def validate(self):
        """Raise ValueError with one clear sentence for a setting that cannot work."""
        checks = [
            (self.init in INIT_MODES, f"init must be one of {INIT_MODES}, got {self.init!r}"),
            (self.engine in hypergrad.ENGINES,
             f"engine must be one of {hypergrad.ENGINES}, got {self.engine!r}"),
            (self.objective in OBJECTIVES,
             f"objective must be one of {OBJECTIVES}, got {self.objective!r}"),
            (self.dtype in ("float32", "float64"), f"dtype must be float32 or float64, got {self.dtype!r}"),
        ]
        for name in ("steps", "epochs", "images_per_class", "batch_size", "n_nets"):
            checks.append((getattr(self, name) >= 1, f"{name} must be at least 1, got {getattr(self, name)}"))
        checks += [
            (self.iterations >= 0, f"iterations must be ≥ 0, got {self.iterations}"),
            (self.distill_lr > 0, f"distill_lr must be positive, got {self.distill_lr}"),
            (self.lr > 0, f"lr (the outer Adam learning rate) must be positive, got {self.lr}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message + ".")
        return self

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}; known keys: {sorted(known)}.")
        values = dict(values)
        if "betas" in values:
            values["betas"] = tuple(values["betas"])
        return cls(**values)


def distilled_labels(num_classes, images_per_class):
    """The fixed labels of every step: class-major, [0,…,0, 1,…,1, …] as in the original code."""
    return np.repeat(np.arange(num_classes), images_per_class)


# ---------------------------------------------------------------------------- the distilled set on disk

DISTILLED_KEYS = ("images", "labels", "lrs", "mean", "std", "config", "version")


@dataclass
class DistilledSet:
    """What a run produces: images (S, n, C, H, W) in normalised space, their labels (n,),
    the learned learning rates (E, S), θ0 for fixed init, and the data normalisation."""

    images: np.ndarray
    labels: np.ndarray
    lrs: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    config: dict
    theta0: dict | None = None
    version: str = ddref.__version__

    def save(self, path):
        arrays = {"images": self.images, "labels": self.labels, "lrs": self.lrs,
                  "mean": self.mean, "std": self.std,
                  "config": np.array(json.dumps(self.config)), "version": np.array(self.version)}
        for k, v in (self.theta0 or {}).items():
            arrays[f"theta0/{k}"] = backend.to_numpy(v)
        atomic_savez(path, arrays)

    @classmethod
    def load(cls, path):
        path = Path(path)
        arrays = _load_npz(path, "distilled set")
        missing = [k for k in DISTILLED_KEYS if k not in arrays]
        if missing:
            raise DistillError(f"{path} is not a distilled set: it lacks {', '.join(missing)}; "
                               f"make one with `ddref distill`.")
        theta0 = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("theta0/")}
        distilled = cls(images=arrays["images"], labels=arrays["labels"], lrs=arrays["lrs"],
                        mean=arrays["mean"], std=arrays["std"],
                        config=json.loads(str(arrays["config"])), theta0=theta0 or None,
                        version=str(arrays["version"]))
        distilled.check()
        return distilled

    def check(self):
        steps, n = self.images.shape[:2]
        if self.images.ndim != 5 or self.lrs.ndim != 2 or self.lrs.shape[1] != steps:
            raise DistillError(
                f"distilled set has images {self.images.shape} and lrs {self.lrs.shape}; expected "
                f"images (steps, n, C, H, W) and lrs (epochs, steps).")
        if self.labels.shape != (n,):
            raise DistillError(f"distilled set has {n} images per step but labels {self.labels.shape}.")
        if not (np.isfinite(self.images).all() and np.isfinite(self.lrs).all()):
            raise DistillError("distilled set contains NaN or inf; it cannot be used.")


def atomic_savez(path, arrays):
    """Write an .npz file so that a crash never leaves a half-written file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _load_npz(path, what):
    if not Path(path).exists():
        raise DistillError(f"no {what} at {path}; check the path.")
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except Exception as error:  # zipfile/pickle/format errors all mean the same to the user
        raise DistillError(f"{path} is not a readable {what} ({error.__class__.__name__}); "
                           f"it may be truncated or corrupt: delete it and run again.") from None


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
        self.dataset = dataset if dataset is not None else data.load(config.dataset)
        self.model = nn.build_model(config.model, self.dataset.image_shape, self.dataset.num_classes)
        self.progress = progress
        self.rng = backend.rng(config.seed)
        dtype = config.dtype
        data.check_finite(self.dataset.x_train, f"the {self.dataset.name} training images")
        self.x_train = backend.asarray(self.dataset.x_train, dtype=dtype)
        self.labels = distilled_labels(self.dataset.num_classes, config.images_per_class)
        self.targets = one_hot(self.labels, self.dataset.num_classes, dtype)
        self.real_targets_of = self._make_real_targets()

        c, h, w = self.dataset.image_shape
        self.theta0 = (self.model.init(self.rng, dtype, config.init_scheme, config.init_scale)
                       if config.init == "fixed" else None)
        self.x = backend.normal(self.rng, (config.steps, len(self.labels), c, h, w), 1.0, dtype)
        self.raw_lrs = backend.asarray(
            np.full((config.epochs, config.steps), inverse_softplus(config.distill_lr)), dtype=dtype)
        self.adam = Adam({"x": self.x, "raw_lrs": self.raw_lrs}, lr=config.lr, betas=config.betas)
        self.iteration = 0
        self.history = History()

    # -- one outer iteration -------------------------------------------------------------

    def _make_real_targets(self):
        cfg, k = self.config, self.dataset.num_classes
        if cfg.objective == "attack":
            return lambda y: attack_targets(y, k, cfg.source_class, cfg.target_class, cfg.dtype)
        return lambda y: one_hot(y, k, cfg.dtype)

    def sample_theta0(self):
        cfg = self.config
        if cfg.init == "fixed":
            return self.theta0
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
        """The outer loss and its gradient, averaged over the ``n_nets`` networks."""
        cfg = self.config
        n_nets = cfg.n_nets if cfg.init == "random" else 1
        theta0s, x_reals, real_targets = [], [], []
        for _ in range(n_nets):                  # same draws, same order as one net at a time
            theta0s.append(self.sample_theta0())
            x_real, targets = self.sample_real_batch()
            x_reals.append(x_real)
            real_targets.append(targets)
        mg = hypergrad.mean_meta_gradient(cfg.engine, self.model.apply, theta0s, self.x, self.targets,
                                          self.raw_lrs, x_reals, real_targets)
        return mg.loss, mg.grad_x, mg.grad_raw_lrs

    def step(self):
        loss, grad_x, grad_raw = self.meta_gradient()
        self._check_healthy(loss, grad_x, grad_raw)
        self.adam.lr = self.outer_lr()
        updated = self.adam.step({"x": self.x, "raw_lrs": self.raw_lrs},
                                 {"x": grad_x, "raw_lrs": grad_raw})
        self.x, self.raw_lrs = updated["x"], updated["raw_lrs"]
        self.iteration += 1
        self.history.iterations.append(self.iteration)
        self.history.losses.append(loss)
        return loss

    def _check_healthy(self, loss, grad_x, grad_raw):
        """Stop with the cause named when the inner training has diverged: a NaN/inf, or an
        outer loss far above chance level (log K, the loss of a uniform guess)."""
        xp = backend.xp()
        finite = (math.isfinite(loss) and bool(xp.isfinite(grad_x).all())
                  and bool(xp.isfinite(grad_raw).all()))
        chance = math.log(self.dataset.num_classes)
        if finite and loss <= DIVERGENCE_FACTOR * chance:
            return
        lrs = backend.to_numpy(self.lrs())
        what = "became NaN/inf" if not finite else f"is {loss:.3g}, far above chance level {chance:.2f}"
        raise DistillError(
            f"the outer loss or its gradient {what} at iteration {self.iteration + 1} "
            f"(learned learning rates now range {lrs.min():.3g}…{lrs.max():.3g}): the inner "
            f"training diverged; lower --distill-lr or the outer --lr and start again, or "
            f"resume from the last good checkpoint.")

    def lrs(self):
        """The learning rates η̃ = softplus(raw), shape (epochs, steps)."""
        return softplus(self.raw_lrs)

    # -- the loop --------------------------------------------------------------------------

    def run(self, iterations=None, checkpoint_path=None):
        """Run until ``iterations`` (default: the config's) outer iterations are done.
        Checkpoints every ``checkpoint_every`` iterations and on Ctrl-C (then re-raises)."""
        total = self.config.iterations if iterations is None else iterations
        bar = tqdm(total=total, initial=self.iteration, desc="distill", unit="it",
                   disable=not self.progress, dynamic_ncols=True)
        if self.iteration == 0 and self.config.eval_every and not self.history.eval_iterations:
            self.record_accuracy()  # the starting point of the accuracy curve
        try:
            while self.iteration < total:
                start = time.perf_counter()
                loss = self.step()
                self.history.seconds += time.perf_counter() - start
                lrs = backend.to_numpy(self.lrs())
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lrs.min():.3f}…{lrs.max():.3f}")
                if self.config.eval_every and self.iteration % self.config.eval_every == 0:
                    self.record_accuracy()
                if checkpoint_path and self.config.checkpoint_every and \
                        self.iteration % self.config.checkpoint_every == 0:
                    self.save_checkpoint(checkpoint_path)
        except KeyboardInterrupt:
            if checkpoint_path:
                self.save_checkpoint(checkpoint_path)
                bar.write(f"interrupted at iteration {self.iteration}; checkpoint saved to "
                          f"{checkpoint_path} (continue with --resume).")
            raise
        finally:
            bar.close()
        if checkpoint_path:
            self.save_checkpoint(checkpoint_path)
        return self

    def record_accuracy(self, n_inits=3):
        """Test accuracy now, for the curves (random init: mean over a few held-out inits)."""
        acc = self.accuracy(n_inits=n_inits)
        self.history.eval_iterations.append(self.iteration)
        self.history.eval_accuracies.append(acc.mean)
        return acc

    def accuracy(self, n_inits=None) -> Accuracy:
        """Test accuracy of networks trained on the current distilled set."""
        n_inits = self.config.eval_inits if n_inits is None else n_inits
        return evaluate_distilled(self.model, self.dataset, self.x, self.labels, self.lrs(),
                                  theta0=self.theta0, n_inits=n_inits, seed=self.config.seed)

    def distilled_set(self) -> DistilledSet:
        theta0 = None if self.theta0 is None else {k: backend.to_numpy(v) for k, v in self.theta0.items()}
        return DistilledSet(images=backend.to_numpy(self.x), labels=self.labels,
                            lrs=backend.to_numpy(self.lrs()), mean=np.asarray(self.dataset.mean),
                            std=np.asarray(self.dataset.std), config=self.config.to_dict(),
                            theta0=theta0)

    # -- checkpoints -----------------------------------------------------------------------

    def save_checkpoint(self, path):
        adam = self.adam.state()
        arrays = {
            "config": np.array(json.dumps(self.config.to_dict())),
            "iteration": np.array(self.iteration),
            "rng_state": np.array(json.dumps(self.rng.bit_generator.state)),
            "x": backend.to_numpy(self.x), "raw_lrs": backend.to_numpy(self.raw_lrs),
            "adam_t": np.array(adam["t"]), "adam_lr": np.array(adam["lr"]),
            "history": np.array(json.dumps(dataclasses.asdict(self.history))),
            "version": np.array(ddref.__version__),
        }
        for k in ("x", "raw_lrs"):
            arrays[f"adam_m/{k}"] = backend.to_numpy(adam["m"][k])
            arrays[f"adam_v/{k}"] = backend.to_numpy(adam["v"][k])
        for k, v in (self.theta0 or {}).items():
            arrays[f"theta0/{k}"] = backend.to_numpy(v)
        atomic_savez(path, arrays)

    @classmethod
    def from_checkpoint(cls, path, dataset=None, progress=True, iterations=None):
        """Rebuild a Distiller exactly as it was when ``path`` was written."""
        arrays = _load_npz(path, "checkpoint")
        for key in ("config", "iteration", "rng_state", "x", "raw_lrs", "adam_t", "history"):
            if key not in arrays:
                raise DistillError(f"{path} is not a ddref checkpoint (no {key!r}); start a new run.")
        config = DistillConfig.from_dict(json.loads(str(arrays["config"])))
        if iterations is not None:
            config.iterations = iterations
        distiller = cls(config, dataset=dataset, progress=progress)
        dtype = config.dtype
        distiller.iteration = int(arrays["iteration"])
        distiller.rng.bit_generator.state = json.loads(str(arrays["rng_state"]))
        distiller.x = backend.asarray(arrays["x"], dtype=dtype)
        distiller.raw_lrs = backend.asarray(arrays["raw_lrs"], dtype=dtype)
        distiller.adam.load_state({
            "t": arrays["adam_t"], "lr": arrays["adam_lr"],
            "m": {k: arrays[f"adam_m/{k}"] for k in ("x", "raw_lrs")},
            "v": {k: arrays[f"adam_v/{k}"] for k in ("x", "raw_lrs")}})
        theta0 = {k.split("/", 1)[1]: backend.asarray(v, dtype=dtype)
                  for k, v in arrays.items() if k.startswith("theta0/")}
        distiller.theta0 = theta0 or None
        distiller.history = History(**json.loads(str(arrays["history"])))
        return distiller


def held_out_accuracy(distilled: DistilledSet, dataset=None, n_inits=None) -> Accuracy:
    """Re-evaluate a saved distilled set the way the run that made it did."""
    config = DistillConfig.from_dict(distilled.config)
    dataset = dataset if dataset is not None else data.load(config.dataset)
    model = nn.build_model(config.model, dataset.image_shape, dataset.num_classes)
    model.check_input(distilled.images.shape)
    theta0 = None
    if distilled.theta0 is not None:
        theta0 = {k: backend.asarray(v, dtype=config.dtype) for k, v in distilled.theta0.items()}
    x = backend.asarray(distilled.images, dtype=config.dtype)
    return evaluate_distilled(model, dataset, x, distilled.labels, backend.asarray(distilled.lrs, dtype=config.dtype),
                              theta0=theta0, n_inits=n_inits or config.eval_inits, seed=config.seed)


__all__ = ["DistillConfig", "Distiller", "DistilledSet", "DistillError", "held_out_accuracy",
           "distilled_labels", "held_out_inits"]
