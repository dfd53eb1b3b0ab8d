"""Every setting of a distillation run, checked before anything is loaded or computed.

One :class:`DistillConfig` drives a run from the command line or from Python; each field is a
command-line option (``lr_decay`` ↔ ``--lr-decay``).  :meth:`DistillConfig.validate` refuses
a setting that cannot work with one sentence that names the option and the fix.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from pathlib import Path

from ddref import data, engines, labels, nn
from ddref.methods import dc as _dc, dm as _dm, kip as _kip

INIT_MODES = ("fixed", "random", "fixed-pretrained", "random-pretrained")
PRETRAINED = ("fixed-pretrained", "random-pretrained")
SAMPLED = ("random", "random-pretrained")     # modes that draw --n-nets networks every iteration
OBJECTIVES = ("classify", "attack")


def _method_defaults(paper, **more):
    """Each method's paper defaults (see DistillConfig.for_method): the outer lr (DC and DM
    update the images by SGD with momentum 0.5, KIP by Adam), the real images of each class per
    iteration (``batch_size`` means *per class* for dc, dm and kip: DC's and DM's 256; KIP's
    5,000 class-balanced targets are 500 per class of a 10-class set), no lr decay, one step of
    one epoch, and init 'random': the sets are judged on fresh networks (the field protocol)."""
    return {"lr": paper["lr_images"] if "lr_images" in paper else paper["lr"],
            "batch_size": paper["batch_real"] if "batch_real" in paper else paper["target_batch"] // 10,
            "decay_every": 0, "init": "random", "steps": 1, "epochs": 1, **more}


METHOD_DEFAULTS = {
    "dc": _method_defaults(_dc.PAPER),
    "dm": _method_defaults(_dm.PAPER),
    "kip": _method_defaults(_kip.PAPER, betas=(0.9, 0.999)),    # jax's Adam, as the KIP notebook
}


class DistillError(RuntimeError):
    """A run that cannot go on (a diverging learning rate, a NaN, a bad checkpoint)."""


@dataclass
class DistillConfig:
    """Every setting of a distillation run.  Defaults: the main job of the README."""

    method: str = "bptt"             # what the outer loop minimises (ddref.objectives.METHODS)
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
    # the methods after Wang et al. (dc, dm, kip) and the field's evaluation protocol
    field_epochs: int = 300          # field protocol (ddref.protocol): epochs of each fresh network
    width: int = 0                   # convnet3: channels of each block (0: the model's default, 128)

    @classmethod
    def for_method(cls, method="bptt", **options):
        """The config of ``method`` with its paper's defaults (:data:`METHOD_DEFAULTS`: outer
        optimiser lr, Adam betas, real images per class, no lr decay, fresh networks), each
        overridden by ``options`` (the settings the user gave)."""
        defaults = dict(METHOD_DEFAULTS.get(method, {}))
        if method == "kip" and options.get("learn_labels"):
            defaults["label_form"] = "free"         # KIP learns the regression targets themselves
        return cls(**{**defaults, **options, "method": method})

    def model_options(self):
        """Keyword options of :func:`ddref.nn.build_model` that the config sets (convnet3's
        ``width``)."""
        return {"width": self.width} if self.width and self.model == "convnet3" else {}

    @property
    def num_inner_steps(self):
        return self.steps * self.epochs

    def validate(self):
        """Raise ValueError with one sentence, naming the command-line option, for a setting
        that cannot work; checked before anything is loaded or computed.  (The method and its
        own options are checked by :func:`ddref.objectives.check`, above this module.)"""
        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name), f.default)
        checks = [
            (_known_dataset(self.dataset), "dataset", "must name a data set listed by `ddref datasets`"),
            (self.model in nn.MODELS, "model", f"must be one of {', '.join(nn.MODELS)}"),
            (self.init in INIT_MODES, "init", f"must be one of {', '.join(INIT_MODES)}"),
            (self.engine in engines.ENGINES, "engine", f"must be one of {', '.join(engines.ENGINES)}"),
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
                     "source_class", "target_class", "field_epochs", "width"):
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
            (not self.width or self.model == "convnet3", "width",
             "only applies to --model convnet3 (the channels of its blocks); leave it at 0"),
            (self.images >= 0, "images", "must be 0 (use --images-per-class) or a number of images"),
            (not self.images or self.images_per_class == 1, "images",
             "and --images-per-class both set the images per step: give only one of them"),
            *self._label_checks(),
            *self._only_with(),
        ]
        for ok, name, rule in checks:
            if not ok:
                raise ValueError(f"{option_name(name)} {rule}; got {getattr(self, name)!r}.")
        engines.check_options(self.engine, self.momentum, self.truncate, "last",
                              self.num_inner_steps)
        return self

    def _label_checks(self):
        """Learned labels get their gradient from the naive and backgrad engines of the plain
        inner loop, and are evaluated by plain training from fixed or random θ0; each conflict
        names the option that conflicts with --learn-labels."""
        if not self.learn_labels:
            return []
        return [
            (engines.ENGINES[self.engine].plain is not None, "engine",
             "gives no gradient for learned labels: use --engine naive or backgrad with --learn-labels"),
            (not self.momentum, "momentum", "cannot be used with --learn-labels: leave it at 0"),
            (not self.truncate, "truncate", "cannot be used with --learn-labels: leave it at 0"),
            (self.init in ("fixed", "random"), "init", "must be fixed or random with --learn-labels"),
            (self.objective == "classify", "objective", "must be classify with --learn-labels"),
        ]

    def _only_with(self):
        """Options that mean something only with another one: each given without it is refused
        (nothing is silently ignored)."""
        defaults = DistillConfig()
        attack = [(name, "only applies to --objective attack")
                  for name in ("source_class", "target_class") if self.objective != "attack"]
        pretrained = [(name, "only applies to --init fixed-pretrained or random-pretrained")
                      for name in ("pool_nets", "pretrain_epochs", "pretrain_lr")
                      if self.init not in PRETRAINED]
        fixed_pretrained = [("pretrained_net", "only applies to --init fixed-pretrained")
                            for _ in [0] if self.init != "fixed-pretrained"]
        return [(getattr(self, name) == getattr(defaults, name), name, rule)
                for name, rule in attack + pretrained + fixed_pretrained]

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


# options that may change when a run is resumed: how long it runs, the outer optimiser's
# schedule, and how often it reports; everything else defines the run and stays as it was
RESUMABLE = ("iterations", "lr", "lr_decay", "decay_every", "eval_every", "eval_inits",
             "checkpoint_every", "label_lr")


def with_resume_changes(config, changes, path):
    """``config`` with the options a resume gives; only those in :data:`RESUMABLE` may differ
    from the saved ones (a value equal to the saved one is always accepted)."""
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


