"""The outer loop every method shares, knowing nothing of any method.

    learned ← objective.initial()
    repeat:   loss, g ← objective.loss_and_grads(learned)      (stop if it diverged)
              learned ← optimiser step along g                   (lr decayed on a schedule)
              objective.after_step(learned)
              every eval_every: a point of the accuracy curve; every checkpoint_every: a checkpoint

An iteration is all or nothing: when it is interrupted (Ctrl-C) the state — random generator
included — is rolled back to its start before the checkpoint is written, so a resumed run
repeats exactly the iterations an uninterrupted one would have done.  When the inner training
diverges, the run rolls back :data:`ROLLBACK` iterations, saves that state, and says how to go
on with a smaller outer learning rate (from the very start: a smaller --distill-lr).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

import ddref
from ddref import backend
from ddref.config import DistillError
from ddref.optim import OPTIMISERS
from ddref.saved import atomic_savez, json_field, json_safe

DIVERGENCE_FACTOR = 100     # an outer loss above this many times chance level means divergence
ROLLBACK = 10               # iterations a diverged run goes back before it saves


class Diverged(DistillError):
    """The inner training diverged; ``from_start`` when the initial set already does."""

    def __init__(self, message, from_start=False):
        super().__init__(message)
        self.from_start = from_start


@dataclass
class History:
    iterations: list = field(default_factory=list)      # outer iteration of each loss
    losses: list = field(default_factory=list)
    eval_iterations: list = field(default_factory=list)
    eval_accuracies: list = field(default_factory=list)
    seconds: float = 0.0


class OuterLoop:
    """State and loop of a distillation run, for any :class:`ddref.objectives.base.Objective`.

        loop = OuterLoop(objective, config).run(checkpoint_path="run/checkpoint.npz")
        result = loop.distilled_set()
    """

    def __init__(self, objective, config, progress=True):
        self.objective, self.config, self.progress = objective, config, progress
        self.rng = objective.rng
        self.learned = objective.initial()
        optimiser = OPTIMISERS[objective.optimiser]
        options = ({"betas": config.betas} if objective.optimiser == "adam"
                   else {"momentum": objective.sgd_momentum})
        self.optimiser = optimiser(self.learned, lr=config.lr, **options)
        self.iteration = 0
        self.history = History()

    # -- one outer iteration -------------------------------------------------------------

    def outer_lr(self):
        cfg = self.config
        if not cfg.decay_every:
            return cfg.lr
        return cfg.lr * cfg.lr_decay ** (self.iteration // cfg.decay_every)

    def step(self):
        loss, grads = self.objective.loss_and_grads(self.learned)
        self._check_healthy(loss, grads)
        self.optimiser.lr = self.outer_lr()
        updated = self.optimiser.step(self.learned, grads)
        for k, scale in self.objective.lr_scales().items():
            # an optimiser step is lr · (direction): scaling it is the same optimiser with the
            # learning rate scale · lr (decayed on the same schedule) for this array
            updated[k] = self.learned[k] + scale * (updated[k] - self.learned[k])
        self.learned = updated
        self.objective.after_step(self.learned)
        self.iteration += 1
        self.history.iterations.append(self.iteration)
        self.history.losses.append(loss)
        return loss

    def _check_healthy(self, loss, grads):
        """Stop with the cause named when the inner training has diverged: a NaN/inf, or a loss
        far above chance level (for classification log K, the loss of a uniform guess)."""
        xp = backend.xp()
        finite = math.isfinite(loss) and all(bool(xp.isfinite(g).all()) for g in grads.values())
        chance = self.objective.chance_loss
        if finite and (chance is None or loss <= DIVERGENCE_FACTOR * chance):
            return
        what = "became NaN/inf" if not finite else f"is {loss:.3g}, far above chance level {chance:.2f}"
        hint = self.objective.divergence_hint(self.learned)
        raise Diverged(f"the outer loss or its gradient {what} at iteration {self.iteration + 1}"
                       f"{f' ({hint})' if hint else ''}: the inner training diverged",
                       from_start=self.iteration == 0)

    # -- the loop --------------------------------------------------------------------------

    def run(self, iterations=None, checkpoint_path=None):
        """Run until ``iterations`` (default: the config's) outer iterations are done,
        checkpointing every ``checkpoint_every`` iterations, at the end, on Ctrl-C and on
        divergence (see the module docstring)."""
        total = self.config.iterations if iterations is None else iterations
        bar = tqdm(total=total, initial=self.iteration, desc="distill", unit="it",
                   disable=not self.progress, dynamic_ncols=True)
        recent = collections.deque([self._snapshot()], maxlen=ROLLBACK + 1)
        quiet = np.errstate(over="ignore", invalid="ignore")   # divergence is checked, and named
        try:
            quiet.__enter__()
            if self.iteration == 0 and not self.history.eval_iterations:
                self.record_accuracy()  # the starting point of the accuracy curve
            while self.iteration < total:
                recent.append(self._snapshot())
                self._iterate(bar, checkpoint_path)
            if self.history.eval_iterations[-1:] != [self.iteration]:
                self.record_accuracy()  # the end point of the accuracy curve
        except KeyboardInterrupt:
            self._restore(recent[-1])
            if checkpoint_path:
                self._save_uninterrupted(checkpoint_path)
                bar.write(f"interrupted; iteration {self.iteration} is complete and saved to "
                          f"{checkpoint_path} (continue with --resume).")
            raise
        except Diverged as error:
            raise self._diverged(error, recent, checkpoint_path) from None
        finally:
            quiet.__exit__(None, None, None)
            bar.close()
        if checkpoint_path:
            self.save_checkpoint(checkpoint_path)
        return self

    def _diverged(self, error, recent, checkpoint_path):
        """Roll back, save, and say how to go on.  Restarting from the iteration before the one
        that diverged would diverge again (its state is what blew up), so the run goes back
        :data:`ROLLBACK` iterations, where a smaller outer lr can take another path.  A set
        that diverges from the start needs a smaller value of the objective's
        ``start_option`` (Algorithm 1: the initial η̃, --distill-lr; the others: --lr)."""
        start = self.objective.start_option
        flag, value = "--" + start.replace("_", "-"), getattr(self.config, start)
        if error.from_start:
            return DistillError(f"{error}: {flag} {value:g} is too large from the start; start "
                                f"again with a smaller one, e.g. `{flag} {value / 4:g} --force` "
                                f"with your other options.")
        smaller = f"a smaller {flag}" if start != "lr" else "it"
        diverged_at = self.iteration
        self._restore(recent[0])
        if checkpoint_path:
            self._save_uninterrupted(checkpoint_path)
        if self.iteration == diverged_at:       # a resumed run that diverges at once
            return DistillError(f"{error}, right after the state it resumed from; start again "
                                f"with --force and a smaller --lr (e.g. {self.config.lr / 4:g})"
                                + (f" or {smaller}." if start != "lr" else "."))
        if not checkpoint_path:
            return DistillError(f"{error}; start again with a smaller outer --lr "
                                f"(e.g. {self.config.lr / 4:g})"
                                + (f" or {smaller}." if start != "lr" else "."))
        out = Path(checkpoint_path).parent
        return DistillError(
            f"{error}. The state of iteration {self.iteration} ({ROLLBACK} iterations earlier, "
            f"or the start) is saved in {checkpoint_path}: continue it with a smaller outer "
            f"learning rate, `ddref distill --resume --out {out} --lr {self.config.lr / 4:g}`"
            + (f", or start again with {smaller} and --force." if start != "lr" else "."))

    def _iterate(self, bar, checkpoint_path):
        """One outer iteration with its bookkeeping: step, progress, curve point, checkpoint."""
        start = time.perf_counter()
        loss = self.step()
        self.history.seconds += time.perf_counter() - start
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", **self.objective.status(self.learned))
        cfg = self.config
        if cfg.eval_every and self.iteration % cfg.eval_every == 0:
            self.record_accuracy()
        if checkpoint_path and cfg.checkpoint_every and self.iteration % cfg.checkpoint_every == 0:
            self.save_checkpoint(checkpoint_path)

    def _snapshot(self):
        """Everything an iteration changes.  Arrays are never modified in place (every update
        makes new arrays), so holding references is enough; the lists are copied."""
        return {"iteration": self.iteration, "rng": self.rng.bit_generator.state,
                "learned": dict(self.learned), "optimiser": self.optimiser.state(),
                "objective": dict(self.objective.state()),
                "history": {k: list(v) if isinstance(v, list) else v
                            for k, v in dataclasses.asdict(self.history).items()}}

    def _restore(self, snapshot):
        self.iteration = snapshot["iteration"]
        self.rng.bit_generator.state = snapshot["rng"]
        self.learned = dict(snapshot["learned"])
        self.optimiser.load_state(snapshot["optimiser"])
        self.objective.restore(snapshot["objective"])
        self.history = History(**snapshot["history"])

    def _save_uninterrupted(self, path):
        """Write a checkpoint with Ctrl-C held back, so a second Ctrl-C cannot cut it short."""
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
        try:
            self.save_checkpoint(path)
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)

    # -- judging ---------------------------------------------------------------------------

    def record_accuracy(self, n_inits=3):
        """Test accuracy now, for the curves (random init: mean over a few held-out inits)."""
        from ddref.evaluate import TrainingDiverged

        try:
            acc = self.accuracy(n_inits=n_inits)
        except TrainingDiverged as error:
            raise Diverged(f"evaluating the distilled set at iteration {self.iteration}: {error}",
                           from_start=self.iteration == 0) from None
        self.history.eval_iterations.append(self.iteration)
        self.history.eval_accuracies.append(acc.mean)
        return acc

    def accuracy(self, n_inits=None):
        return self.objective.accuracy(self.learned, n_inits)

    def distilled_set(self):
        return self.objective.distilled_set(self.learned)

    # -- checkpoints -----------------------------------------------------------------------

    def save_checkpoint(self, path):
        state = self.optimiser.state()
        arrays = {
            "config": np.array(json.dumps(self.config.to_dict())),
            "iteration": np.array(self.iteration),
            "rng_state": np.array(json.dumps(self.rng.bit_generator.state)),
            "adam_t": np.array(state["t"]), "adam_lr": np.array(state["lr"]),
            "history": np.array(json.dumps(json_safe(dataclasses.asdict(self.history)))),
            "version": np.array(ddref.__version__),
        }
        for k, value in self.learned.items():
            arrays[k] = backend.to_numpy(value)
            arrays[f"adam_m/{k}"] = backend.to_numpy(state["m"][k])
            arrays[f"adam_v/{k}"] = backend.to_numpy(state["v"][k])
        for k, value in self.objective.state().items():
            arrays[k] = backend.to_numpy(value)
        atomic_savez(path, arrays)

    def load_state(self, arrays, path):
        """Put the arrays of a checkpoint in place, after checking they fit this run."""
        def damaged(what):
            return DistillError(f"{path} is damaged ({what}); start a new run with --force.")

        missing = [k for k in ("iteration", "rng_state", "adam_t", "adam_lr", "history",
                               *self.learned, *(f"adam_{m}/{k}" for m in "mv" for k in self.learned))
                   if k not in arrays]
        if missing:
            raise DistillError(f"{path} is not a checkpoint of this run (it lacks "
                               f"{', '.join(missing)}); start a new run with --force.")
        iteration = int(arrays["iteration"])
        if iteration < 0:
            raise damaged(f"iteration {iteration}")
        try:
            self.rng.bit_generator.state = json_field(arrays, "rng_state", path, "checkpoint")
        except (TypeError, ValueError, KeyError):
            raise damaged("its random-generator state") from None
        dtype = self.config.dtype
        want = {k: v.shape for k, v in self.learned.items()}
        self.learned = {k: checked_array(arrays, k, shape, dtype, path) for k, shape in want.items()}
        self.optimiser.load_state({
            "t": arrays["adam_t"], "lr": arrays["adam_lr"],
            "m": {k: checked_array(arrays, f"adam_m/{k}", s, dtype, path) for k, s in want.items()},
            "v": {k: checked_array(arrays, f"adam_v/{k}", s, dtype, path) for k, s in want.items()}})
        self.objective.load_state(arrays, path)
        try:
            self.history = History(**json_field(arrays, "history", path, "checkpoint"))
        except TypeError:
            raise damaged("its history") from None
        self.iteration = iteration
        return self


def checked_array(arrays, key, shape, dtype, path):
    """``arrays[key]`` on the device in ``dtype``, if it is finite floats of ``shape``."""
    array = arrays[key]
    if array.shape != tuple(shape) or array.dtype.kind != "f" or not np.isfinite(array).all():
        raise DistillError(f"{path} is damaged: {key} has shape {array.shape} and type "
                           f"{array.dtype} (want finite floats of shape {tuple(shape)}); "
                           f"start a new run with --force.")
    return backend.asarray(array, dtype=dtype)
