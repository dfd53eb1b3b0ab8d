"""DC, Dataset Condensation with Gradient Matching (Zhao, Mopuri & Bilen, ICLR 2021), in the
outer loop.  The loss and the network's training are :mod:`ddref.methods.dc`:

    L_DC(S; θ) = Σ_c D( ∇θ ℓ(T_c; θ), ∇θ ℓ(S_c; θ) )            (paper eq. 9, D of eq. 10)

DC's own loop (its Algorithm 1, the official main.py) is

    for it in 1 … 1000:                       θ ~ p(θ0), a fresh network
        for ol in 0 … outer_loop − 1:
            S ← S − η_S ∇S L_DC(S; θ)         a real batch of 256 per class; SGD, momentum 0.5
            if ol == outer_loop − 1: break
            θ ← inner_loop epochs of SGD (lr 0.01) on S

with (outer_loop, inner_loop) = ddref.methods.dc.schedule(images per class).  Here **one outer
iteration of ddref's loop is one matching step** (one ``ol``): iteration i is step
ol = i mod outer_loop of DC's outer iteration ⌊i / outer_loop⌋, so ``--iterations`` counts
matching steps and DC's 1,000 iterations at 10 images per class are 10,000 of them.  The network
θ and the position ol are this objective's state: drawn at ol = 0 in :meth:`loss_and_grads`,
trained in :meth:`after_step`, kept in every checkpoint and snapshot so that Ctrl-C, rollback
and resume are exact.

The images start as random real images of their class (DC's code offers noise or real; DM's
default, and what makes few iterations worthwhile on a CPU).  No augmentation, no BatchNorm
(see :mod:`ddref.methods.dc` for every difference from the official code).
"""

from __future__ import annotations

import numpy as np
from autograd import value_and_grad

from ddref import backend
from ddref.config import DistillError
from ddref.loop import checked_array
from ddref.methods import dc
from ddref.objectives.pool import PoolObjective


class GradientMatching(PoolObjective):
    """DC: match the per-class gradients of real and synthetic images along a training path."""

    name = "dc"
    paper = dc.PAPER
    citation = "Zhao, Mopuri & Bilen, Dataset Condensation with Gradient Matching, ICLR 2021"

    def __init__(self, config, dataset, rng, progress=True):
        super().__init__(config, dataset, rng, progress)
        self.outer_loop, self.inner_loop = dc.schedule(config.images_per_class)
        dtype = config.dtype
        self.theta = {k: backend.xp().zeros(s, dtype=dtype) for k, s in self.model.init.shapes.items()}
        self.position = 0            # ol: the matching step within the current network's turn

    @classmethod
    def check_config(cls, config):
        super().check_config(config)
        if config.images_per_class not in dc.SCHEDULE:
            raise ValueError(f"--images-per-class {config.images_per_class}: DC's schedule (the "
                             f"official get_loops) is defined for "
                             f"{', '.join(map(str, dc.SCHEDULE))} images per class; choose one of those.")

    def loss_and_grads(self, learned):
        """L_DC and ∂L_DC/∂x̃ at the current θ (a fresh one at ol = 0), on a fresh real batch
        of ``batch_size`` images per class."""
        cfg = self.config
        if self.position == 0:
            self.theta = self.model.init(self.rng, cfg.dtype, cfg.init_scheme, cfg.init_scale)
        x_real, y_real = self.real_images(cfg.batch_size)
        theta = self.theta
        loss, g = value_and_grad(lambda x: dc.dc_loss(self.model, theta, x, self.labels,
                                                      x_real, y_real))(self.images(learned))
        return float(loss), {"x": g[None]}

    def after_step(self, learned):
        """θ ← inner_loop epochs of SGD on the updated set, unless this was the network's last
        matching step (then the next iteration draws a fresh θ)."""
        if self.position == self.outer_loop - 1:
            self.position = 0
            return
        n = len(self.labels)
        self.theta = dc.train_network(self.model, self.theta, self.images(learned), self.labels,
                                      self.inner_loop, rng=self.rng if n > dc.PAPER["batch_train"] else None)
        self.position += 1

    def status(self, learned):
        return {"ol": f"{self.position + 1}/{self.outer_loop}"}

    # -- state: θ and ol ---------------------------------------------------------------------

    def state(self):
        return {**{f"dc_theta/{k}": v for k, v in self.theta.items()},
                "dc_position": np.array(self.position)}

    def restore(self, state):
        self.theta = {k.split("/", 1)[1]: v for k, v in state.items() if k.startswith("dc_theta/")}
        self.position = int(state["dc_position"])

    def load_state(self, arrays, path):
        shapes = self.model.init.shapes
        keys = sorted(k.split("/", 1)[1] for k in arrays if k.startswith("dc_theta/"))
        if keys != sorted(shapes) or "dc_position" not in arrays:
            raise DistillError(f"{path} is damaged: its DC network does not fit the "
                               f"{self.config.model} model; start a new run with --force.")
        position = int(arrays["dc_position"])
        if not 0 <= position < self.outer_loop:
            raise DistillError(f"{path} is damaged: its DC position {position} is outside 0 … "
                               f"{self.outer_loop - 1}; start a new run with --force.")
        self.theta = {k: checked_array(arrays, f"dc_theta/{k}", s, self.config.dtype, path)
                      for k, s in shapes.items()}
        self.position = position
