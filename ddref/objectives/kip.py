"""KIP, Kernel Inducing Points (Nguyen, Chen & Lee, ICLR 2021), in the outer loop.  The loss is
:func:`ddref.methods.kip.kip_loss`, kernel ridge regression from the support set S = (X_s, y_s)
to a real target batch (X_t, y_t) with the infinite-width NTK of a one-hidden-layer ReLU network:

    L_KIP(X_s, y_s) = ½ mean( (y_t − K_ts (K_ss + λ tr(K_ss)/n I)⁻¹ y_s)² )       (paper eq. 5)

One outer iteration = one class-balanced real batch of ``batch_size`` images per class (the
notebook's 5,000 targets are 500 per class of a 10-class set), drawn from ``self.rng``; Adam
(β = 0.9, 0.999, lr 0.04) on the support images, as the KIP notebook.  The support images start
as random real images of their class (the notebook's class-balanced sample), their labels as
centred one-hot rows (one-hot − 1/K).

``--learn-labels`` also learns the labels y_s ("KIP + label learning"), an array ``label_logits``
(n, K) used as the regression targets themselves (``--label-form free``), at ``--label-lr``.  The
kernel needs no network; ``--model`` names the network the set is judged with under the field
protocol, which trains it by cross-entropy on the learned labels un-centred (y_s + 1/K: the
hard labels are one-hot rows), as ddref trains free labels.
"""

from __future__ import annotations

from autograd import value_and_grad

from ddref import backend
from ddref.methods import kip
from ddref.objectives.pool import PoolObjective


class KernelInducingPoints(PoolObjective):
    """KIP: the support set whose kernel ridge regression fits the real data."""

    name = "kip"
    paper = kip.PAPER
    citation = "Nguyen, Chen & Lee, Dataset Meta-Learning from Kernel Ridge-Regression, ICLR 2021"
    optimiser = "adam"

    @classmethod
    def more_refusals(cls, config):
        return ()

    @classmethod
    def check_config(cls, config):
        super().check_config(config)
        if config.learn_labels and config.label_form != "free":
            raise ValueError("--label-form softmax does not apply to --method kip, which learns "
                             "the regression targets themselves; use --label-form free.")

    def initial(self):
        learned = super().initial()
        if self.config.learn_labels:
            learned["label_logits"] = self.centred_labels()
        return learned

    def centred_labels(self):
        return kip.one_hot_labels(self.labels, self.dataset.num_classes, dtype=self.config.dtype)

    def lr_scales(self):
        return {"label_logits": self.config.label_lr / self.config.lr} if self.config.learn_labels else {}

    def loss_and_grads(self, learned):
        cfg, k = self.config, self.dataset.num_classes
        x_target, y = self.real_images(cfg.batch_size)
        y_target = kip.one_hot_labels(y, k, dtype=cfg.dtype)
        y_support = learned.get("label_logits", self.centred_labels())
        loss, (gx, gy) = value_and_grad(
            lambda x, ys: kip.kip_loss(x, ys, x_target, y_target), argnum=(0, 1))(
            self.images(learned), y_support)
        grads = {"x": gx[None]}
        if cfg.learn_labels:
            grads["label_logits"] = gy
        return float(loss), grads

    def soft_labels(self, learned):
        """Learned labels un-centred, (1, n, K): what networks are trained on; None otherwise."""
        if "label_logits" not in learned:
            return None
        return (learned["label_logits"] + 1.0 / self.dataset.num_classes)[None]

    def status(self, learned):
        return {}
