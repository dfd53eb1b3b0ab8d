"""The interface between the outer loop and a method.

The outer loop (:class:`ddref.loop.OuterLoop`) owns what every method shares: the learned
arrays, the optimiser, the random generator, the iteration count and history, snapshots and
rollback, checkpoints, exact resume, progress and divergence checks.  An :class:`Objective`
says what is learned and what it costs:

    learned = objective.initial()                      # the arrays at iteration 0
    loss, grads = objective.loss_and_grads(learned)    # one outer iteration's loss and gradient
    learned ← optimiser step along grads                (the loop)
    objective.after_step(learned)                      # state that moves with the set (optional)

and how a set is judged (:meth:`accuracy`) and saved (:meth:`distilled_set`).  Every random
choice comes from ``self.rng``, the loop's generator, so snapshots and checkpoints restore it.
"""

from __future__ import annotations


class Objective:
    """Base class of the methods in :mod:`ddref.objectives`.  Subclasses implement
    :meth:`initial`, :meth:`loss_and_grads`, :meth:`accuracy` and :meth:`distilled_set`; the
    rest has defaults that fit a method without state of its own."""

    name = ""
    optimiser = "adam"           # the outer optimiser: 'adam' (config lr, betas) or 'sgd'
    sgd_momentum = 0.5           # with optimiser 'sgd'
    chance_loss = None           # a loss above ddref.loop.DIVERGENCE_FACTOR × this is divergence
    start_option = "lr"          # the option to lower when the very first iterations diverge

    def __init__(self, config, dataset, rng, progress=True):
        self.config, self.dataset, self.rng, self.progress = config, dataset, rng, progress

    @classmethod
    def check_config(cls, config):
        """Raise ValueError, one sentence naming the option, for a setting this method cannot
        use; called before anything is loaded."""

    # -- what is learned -------------------------------------------------------------------

    def initial(self) -> dict:
        """The learned arrays at iteration 0, by name (drawn from ``self.rng``)."""
        raise NotImplementedError

    def loss_and_grads(self, learned: dict):
        """(loss as a float, gradients keyed like ``learned``) for one outer iteration."""
        raise NotImplementedError

    def lr_scales(self) -> dict:
        """Per learned array, its learning rate as a multiple of the outer lr (default 1)."""
        return {}

    def after_step(self, learned: dict):
        """Called after every optimiser step, with the new arrays."""

    # -- state beyond the learned arrays -------------------------------------------------------

    def state(self) -> dict:
        """Arrays (host or device) a checkpoint keeps besides the learned ones, by a name that
        may contain '/'.  Never modified in place, so a snapshot may hold references."""
        return {}

    def load_state(self, arrays: dict, path):
        """Put back what :meth:`state` returned, from a checkpoint's arrays (checked)."""

    def restore(self, state: dict):
        """Put back what :meth:`state` returned earlier in this run (a snapshot)."""

    # -- judging and saving ------------------------------------------------------------------

    def accuracy(self, learned: dict, n_inits=None):
        """Test accuracy (:class:`ddref.evaluate.Accuracy`) of networks trained on the set."""
        raise NotImplementedError

    def distilled_set(self, learned: dict):
        """The set as a :class:`ddref.saved.DistilledSet`, arrays on the host."""
        raise NotImplementedError

    def status(self, learned: dict) -> dict:
        """Short numbers for the progress bar, e.g. {'lr': '0.01…0.03'}."""
        return {}

    def divergence_hint(self, learned: dict) -> str:
        """A phrase for the divergence message, e.g. the range of the learned lrs."""
        return ""
