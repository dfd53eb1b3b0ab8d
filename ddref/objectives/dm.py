"""DM, Dataset Condensation with Distribution Matching (Zhao & Bilen, WACV 2023), in the outer
loop.  The loss is :func:`ddref.methods.dm.dm_loss`:

    L_DM(S) = Σ_c ‖ mean_{x ∈ T_c} ψθ(x) − mean_{x̃ ∈ S_c} ψθ(x̃) ‖²        (paper eq. 4)

one outer iteration = one fresh random network θ ~ p(θ0) (never trained) and one real batch of
``batch_size`` images per class, both drawn from ``self.rng``; the gradient w.r.t. S is first
order.  The images start as random real images of their class (DM's default) and are updated
by SGD with momentum 0.5 at lr 1 (the official main_DM.py).  No augmentation (the official DM
applies DSA); see :mod:`ddref.methods.dm` for the embedding of each model.
"""

from __future__ import annotations

from autograd import value_and_grad

from ddref.methods import dm
from ddref.objectives.pool import PoolObjective


class DistributionMatching(PoolObjective):
    """DM: match the mean embedding of each class under a fresh random network."""

    name = "dm"
    paper = dm.PAPER
    citation = "Zhao & Bilen, Dataset Condensation with Distribution Matching, WACV 2023"
    models = dm.EMBEDDED_MODELS

    def loss_and_grads(self, learned):
        cfg = self.config
        theta = self.model.init(self.rng, cfg.dtype, cfg.init_scheme, cfg.init_scale)
        x_real, y_real = self.real_images(cfg.batch_size)
        loss, g = value_and_grad(lambda x: dm.dm_loss(cfg.model, theta, x, self.labels, x_real,
                                                      y_real, self.dataset.num_classes))(self.images(learned))
        return float(loss), {"x": g[None]}
