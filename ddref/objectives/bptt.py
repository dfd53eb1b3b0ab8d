"""Algorithm 1 of Wang et al. (2018): learn distilled images x̃ and learning rates η̃ by
back-propagating through the inner training ("bptt").

    each outer iteration:
        θ0 ← the fixed initialisation, or fresh draws θ0 ~ p(θ0)           (init mode, §3.2–3.6)
        θ_T ← E epochs × S steps of  θ ← θ − η̃[e, s] ∇θ ℓ(x̃[s], θ)          (ddref.unroll)
        L ← ℓ_obj(x_real, θ_T) on a random real batch                        (classify | attack)
        gradient ∂L/∂(x̃, raw η̃)                                              (ddref.engines)

Beyond the paper: learned labels (ddref.labels), a random step order, momentum and truncation
of the inner loop.  Everything the outer loop does with the gradient is in :mod:`ddref.loop`.
"""

from __future__ import annotations

import math

import numpy as np
from tqdm import tqdm

from ddref import backend, data, engines, labels, nn, sizes
from ddref.config import PRETRAINED, SAMPLED, DistillError, option_name
from ddref.evaluate import Accuracy, evaluate_distilled, held_out_inits
from ddref.losses import attack_targets, one_hot
from ddref.loop import checked_array
from ddref.objectives.base import Objective
from ddref.saved import DistilledSet
from ddref.unroll import inverse_softplus, softplus


class Algorithm1(Objective):
    """The paper's objective: the loss of networks trained on (x̃, η̃) on real data."""

    name = "bptt"
    start_option = "distill_lr"      # the initial η̃: a set that diverges at once needs a smaller one

    def __init__(self, config, dataset, rng, progress=True):
        super().__init__(config, dataset, rng, progress)
        self.model = nn.build_model(config.model, dataset.image_shape, dataset.num_classes,
                                    **config.model_options())
        data.check_finite(dataset.x_train, f"the {dataset.name} training images")
        self.x_train = backend.asarray(dataset.x_train, dtype=config.dtype)
        k = dataset.num_classes
        self.chance_loss = math.log(k)          # the loss of a uniform guess
        self.labels = labels.assigned_labels(k, config.images or config.images_per_class * k)
        self.targets = one_hot(self.labels, k, config.dtype)
        self._check_fits_the_data()
        sizes.check_fits(self.memory_parts(), "lower --steps, --epochs, --images(-per-class), "
                                              "--n-nets or --batch-size")
        self.pools = self._load_pools() if config.init in PRETRAINED else None
        self.theta0 = None
        if config.init == "fixed":
            self.theta0 = self.model.init(rng, config.dtype, config.init_scheme, config.init_scale)
        elif config.init == "fixed-pretrained":
            self.theta0 = self.pools.train.network(config.pretrained_net, config.dtype)

    def _check_fits_the_data(self):
        cfg, y, k = self.config, self.dataset.y_train, self.dataset.num_classes
        if cfg.batch_size > len(y):
            raise ValueError(f"--batch-size {cfg.batch_size} is more than the {len(y)} training "
                             f"images of {self.dataset.name}; use at most {len(y)}.")
        counts = np.bincount(y, minlength=k)
        wanted = np.bincount(self.labels, minlength=k)
        if (wanted > counts).any():
            c = int(np.argmax(wanted - counts))
            option = (f"--images {cfg.images}" if cfg.images
                      else f"--images-per-class {cfg.images_per_class}")
            raise ValueError(f"{option} asks for {wanted[c]} images of class {c}, more than its "
                             f"{counts[c]} training images in {self.dataset.name}, which the "
                             f"random-real baseline draws from; ask for fewer.")
        for name in ("source_class", "target_class"):
            if cfg.objective == "attack" and getattr(cfg, name) >= k:
                raise ValueError(f"{option_name(name)} {getattr(cfg, name)} is not a class of "
                                 f"{self.dataset.name} (0 … {k - 1}).")

    def memory_parts(self) -> dict:
        """Bytes the run will hold at once, by what holds them, from the settings alone."""
        cfg, b = self.config, np.dtype(self.config.dtype).itemsize
        image = int(np.prod(self.dataset.image_shape)) * b
        params = sum(int(np.prod(s)) for s in self.model.init.shapes.values()) * b
        n, k, steps = len(self.labels), self.dataset.num_classes, cfg.num_inner_steps
        nets = cfg.n_nets if cfg.init in SAMPLED else 1
        kept = {"naive": 2 * (steps + 1), "backgrad": steps + 1,          # θ copies an engine keeps
                "checkpoint": 3 * math.isqrt(steps) + 3, "reverse": 4}[cfg.engine]
        if cfg.truncate:
            kept = min(kept, 2 * (cfg.truncate + 1))
        batch = min(cfg.batch_size, len(self.dataset.y_train))
        return {"the distilled images and their optimiser state": 4 * cfg.steps * n * (image + k * b),
                "the learned learning rates": 4 * cfg.epochs * cfg.steps * b,
                "the networks and real batches of one iteration": nets * (params + batch * image),
                "the weights the meta-gradient keeps": kept * params * (nets if nets > 1 else 1)}

    def _load_pools(self):
        """The training and held-out pools (trained now if absent), recorded in the config."""
        from ddref import pretrained

        pools = pretrained.pools_for(self.config, self.dataset, progress=self.progress, log=tqdm.write)
        self.config.train_pool = pretrained.pool_label(pools.train)
        self.config.eval_pool = pretrained.pool_label(pools.held_out)
        return pools

    def initial(self):
        cfg, (c, h, w) = self.config, self.dataset.image_shape
        learned = {"x": backend.normal(self.rng, (cfg.steps, len(self.labels), c, h, w), 1.0, cfg.dtype),
                   "raw_lrs": backend.asarray(np.full((cfg.epochs, cfg.steps),
                                                      inverse_softplus(cfg.distill_lr)), dtype=cfg.dtype)}
        if cfg.learn_labels:
            learned["label_logits"] = labels.initial_logits(
                self.labels, self.dataset.num_classes, cfg.steps, cfg.dtype, cfg.label_init,
                cfg.label_form)
        return learned

    def lr_scales(self):
        return {"label_logits": self.config.label_lr / self.config.lr} if self.config.learn_labels else {}

    # -- the meta-gradient -------------------------------------------------------------------

    def sample_theta0(self):
        cfg = self.config
        if cfg.init in ("fixed", "fixed-pretrained"):
            return self.theta0
        if cfg.init == "random-pretrained":
            return self.pools.train.network(int(self.rng.integers(len(self.pools.train))), cfg.dtype)
        return self.model.init(self.rng, cfg.dtype, cfg.init_scheme, cfg.init_scale)

    def sample_real_batch(self):
        """A random real batch and its outer targets: the true labels, or for the attack
        (§3.7) the labels with class K read as T."""
        cfg, y, k = self.config, self.dataset.y_train, self.dataset.num_classes
        idx = self.rng.choice(len(y), size=min(cfg.batch_size, len(y)), replace=False)
        targets = (attack_targets(y[idx], k, cfg.source_class, cfg.target_class, cfg.dtype)
                   if cfg.objective == "attack" else one_hot(y[idx], k, cfg.dtype))
        return self.x_train[backend.asarray(idx)], targets

    def inner_targets(self, learned):
        """The fixed one-hot labels (n, K) shared by every step, or the learned labels
        softmax(z) — or z itself for --label-form free — (S, n, K)."""
        if "label_logits" not in learned:
            return self.targets
        return labels.soft_targets(learned["label_logits"], self.config.label_form)

    def meta_gradients(self, learned):
        """The outer loss and its gradient w.r.t. every learned array, averaged over the
        ``n_nets`` networks (the steps in their order)."""
        cfg = self.config
        theta0s, x_reals, real_targets = [], [], []
        for _ in range(cfg.n_nets if cfg.init in SAMPLED else 1):   # θ0, then its batch
            theta0s.append(self.sample_theta0())
            x_real, batch_targets = self.sample_real_batch()
            x_reals.append(x_real)
            real_targets.append(batch_targets)
        targets = self.inner_targets(learned)
        meta = engines.mean_meta_gradient(
            cfg.engine, self.model.apply, theta0s, learned["x"], targets, learned["raw_lrs"],
            x_reals, real_targets, momentum=cfg.momentum, truncate=cfg.truncate,
            wrt_targets=cfg.learn_labels)
        grads = {"x": meta.grad_x, "raw_lrs": meta.grad_raw_lrs}
        if cfg.learn_labels:     # through t = softmax(z) (or t = z) to the label vectors z
            grads["label_logits"] = labels.logits_gradient(targets, meta.grad_targets, cfg.label_form)
        return meta.loss, grads

    def loss_and_grads(self, learned):
        """:meth:`meta_gradients` with the steps in their order, or — with ``order='random'`` —
        in a fresh random order (the rate η̃[e, s] stays with position s, each image keeps its
        label), the gradients mapped back to x̃."""
        if self.config.order == "learned":
            return self.meta_gradients(learned)
        order = backend.asarray(self.rng.permutation(self.config.steps))
        per_image = [k for k in ("x", "label_logits") if k in learned]
        loss, grads = self.meta_gradients({**learned, **{k: learned[k][order] for k in per_image}})
        for k in per_image:
            permuted, grads[k] = grads[k], backend.xp().empty_like(grads[k])
            grads[k][order] = permuted
        return loss, grads

    # -- state, judging, saving ------------------------------------------------------------

    def state(self):
        if self.config.init != "fixed":
            return {}
        return {f"theta0/{k}": v for k, v in self.theta0.items()}

    def load_state(self, arrays, path):
        if self.config.init != "fixed":
            return
        shapes = self.model.init.shapes
        if sorted(shapes) != sorted(k.split("/", 1)[1] for k in arrays if k.startswith("theta0/")):
            raise DistillError(f"{path} is damaged: its θ0 does not fit the {self.config.model} "
                               f"model; start a new run with --force.")
        self.theta0 = {k: checked_array(arrays, f"theta0/{k}", shape, self.config.dtype, path)
                       for k, shape in shapes.items()}

    def lrs(self, learned):
        """The learning rates η̃ = softplus(raw), shape (epochs, steps)."""
        return softplus(learned["raw_lrs"])

    def status(self, learned):
        lrs = backend.to_numpy(self.lrs(learned))
        return {"lr": f"{lrs.min():.3f}…{lrs.max():.3f}"}

    def divergence_hint(self, learned):
        lrs = backend.to_numpy(self.lrs(learned))
        return f"learned learning rates now range {lrs.min():.3g}…{lrs.max():.3g}"

    def soft_labels(self, learned):
        """The learned labels as training targets (S, n, K), or None with fixed labels."""
        return self.inner_targets(learned) if "label_logits" in learned else None

    def accuracy(self, learned, n_inits=None) -> Accuracy:
        """Test accuracy of networks trained on the set the way it was learned."""
        return evaluate_distilled(self.model, self.dataset, learned["x"], self.labels,
                                  self.lrs(learned), momentum=self.config.momentum,
                                  inits=self.evaluation_networks(n_inits),
                                  soft_labels=self.soft_labels(learned))

    def evaluation_networks(self, n=None):
        """The θ0 of the networks a set is judged on: the fixed θ0 (fixed and
        fixed-pretrained), networks of the held-out pool (random-pretrained), or held-out
        random initialisations (random)."""
        cfg = self.config
        n = cfg.eval_inits if n is None else n
        if self.theta0 is not None:
            return [self.theta0]
        if cfg.init == "random-pretrained":
            return self.pools.held_out.networks(range(min(n, len(self.pools.held_out))), cfg.dtype)
        return held_out_inits(self.model, n, cfg.seed, cfg.dtype)

    def distilled_set(self, learned) -> DistilledSet:
        theta0 = None if self.theta0 is None else {k: backend.to_numpy(v) for k, v in self.theta0.items()}
        soft = self.soft_labels(learned)
        return DistilledSet(images=backend.to_numpy(learned["x"]), labels=self.labels,
                            lrs=backend.to_numpy(self.lrs(learned)), mean=np.asarray(self.dataset.mean),
                            std=np.asarray(self.dataset.std), config=self.config.to_dict(),
                            theta0=theta0, classes=tuple(self.dataset.classes),
                            soft_labels=None if soft is None else backend.to_numpy(soft))
