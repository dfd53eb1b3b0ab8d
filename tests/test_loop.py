"""The outer loop knows nothing of any method: a method defined here, in the test file, plugs
in with one registration and inherits checkpoints, exact resume after Ctrl-C and the saved set.
And when the inner training diverges, the advice it gives works when followed literally."""

import numpy as np
import pytest

from ddref import backend, data, objectives
from ddref.config import DistillConfig, DistillError
from ddref.distill import Distiller
from ddref.evaluate import Accuracy
from ddref.loop import ROLLBACK
from ddref.objectives.base import Objective
from ddref.saved import DistilledSet


class ClassMeans(Objective):
    """A toy method: one image per class, pulled towards a random real image of its class at
    every iteration, ½‖x̃_c − x_c‖² summed over classes (its optimum is the class mean)."""

    name = "class-means"
    optimiser = "sgd"

    def initial(self):
        c, h, w = self.dataset.image_shape
        return {"x": backend.normal(self.rng, (self.dataset.num_classes, c, h, w), 1.0,
                                    self.config.dtype)}

    def loss_and_grads(self, learned):
        x_train, y = self.dataset.x_train, self.dataset.y_train
        picks = np.array([self.rng.choice(np.flatnonzero(y == c)) for c in range(len(learned["x"]))])
        diff = learned["x"] - x_train[picks]
        return float(0.5 * np.sum(diff ** 2)), {"x": diff}

    def accuracy(self, learned, n_inits=None):
        x = self.dataset.x_test.reshape(len(self.dataset.x_test), -1)
        means = learned["x"].reshape(len(learned["x"]), -1)
        nearest = np.argmin(((x[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
        return Accuracy.of([np.mean(nearest == self.dataset.y_test)])

    def distilled_set(self, learned):
        k = self.dataset.num_classes
        return DistilledSet(images=learned["x"][None], labels=np.arange(k), lrs=np.ones((1, 1)),
                            mean=np.asarray(self.dataset.mean), std=np.asarray(self.dataset.std),
                            config=self.config.to_dict(), classes=tuple(self.dataset.classes))


@pytest.fixture(scope="module")
def digits():
    return data.load("digits", dtype="float64")


@pytest.fixture
def registered():
    objectives.register("class-means", ClassMeans)
    yield
    del objectives.METHODS["class-means"]


def toy(**overrides):
    values = dict(method="class-means", dtype="float64", lr=0.1, iterations=12, eval_every=4,
                  checkpoint_every=3, seed=5)
    return DistillConfig(**{**values, **overrides})


def test_a_method_defined_here_runs_through_the_loop(registered, digits):
    loop = Distiller(toy(), dataset=digits, progress=False).run()
    assert loop.iteration == 12
    assert loop.history.losses[-1] < loop.history.losses[0] / 2
    assert loop.history.eval_iterations == [0, 4, 8, 12]
    assert loop.history.eval_accuracies[-1] > 0.8        # nearest class mean on digits
    assert loop.distilled_set().images.shape == (1, 10, 1, 8, 8)


def test_the_new_method_resumes_exactly_after_an_interrupt(registered, digits, tmp_path, monkeypatch):
    whole = Distiller(toy(), dataset=digits, progress=False).run()

    path = tmp_path / "checkpoint.npz"
    calls = {"n": 0}
    original = ClassMeans.loss_and_grads

    def interrupted(self, learned):
        calls["n"] += 1
        if calls["n"] == 8:                      # half-way through iteration 8
            raise KeyboardInterrupt
        return original(self, learned)

    monkeypatch.setattr(ClassMeans, "loss_and_grads", interrupted)
    with pytest.raises(KeyboardInterrupt):
        Distiller(toy(), dataset=digits, progress=False).run(checkpoint_path=path)
    monkeypatch.setattr(ClassMeans, "loss_and_grads", original)

    resumed = Distiller.from_checkpoint(path, dataset=digits, progress=False)
    assert resumed.iteration == 7                # the interrupted iteration was rolled back
    resumed.run(checkpoint_path=path)
    assert np.array_equal(resumed.learned["x"], whole.learned["x"])
    assert resumed.history.losses == whole.history.losses
    assert resumed.optimiser.state()["t"] == whole.optimiser.state()["t"] == 12


def test_an_unknown_method_is_one_sentence():
    with pytest.raises(ValueError, match="--method must be one of bptt"):
        objectives.check(DistillConfig(method="nope"))


# ---------------------------------------------------------------------------- divergence advice


def diverging(**overrides):
    values = dict(lr=0.3, iterations=40, checkpoint_every=5, eval_every=0)   # as in issue 22
    return DistillConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def digits32():
    return data.load("digits", dtype="float32")


def test_the_divergence_advice_followed_literally_gets_past_the_iteration(digits32, tmp_path):
    path = tmp_path / "checkpoint.npz"
    with pytest.raises(DistillError, match="diverged") as caught:
        Distiller(diverging(), dataset=digits32, progress=False).run(checkpoint_path=path)
    message = str(caught.value)
    diverged_at = int(message.split("at iteration ")[1].split()[0])
    advised_lr = float(message.split("--lr ")[1].split("`")[0])
    assert "--resume" in message and advised_lr == pytest.approx(0.3 / 4)
    resumed = Distiller.from_checkpoint(path, dataset=digits32, progress=False,
                                        changes={"lr": advised_lr})
    assert resumed.iteration == max(0, diverged_at - 1 - ROLLBACK)
    resumed.run(checkpoint_path=path)                      # no DistillError
    assert resumed.iteration == 40 > diverged_at


def test_a_set_that_diverges_from_the_start_advises_a_smaller_distill_lr(digits32):
    with pytest.raises(DistillError, match=r"--distill-lr 2500 --force"):
        Distiller(diverging(distill_lr=1e4), dataset=digits32, progress=False).run()


def test_divergence_advice_names_only_options_the_method_has(digits32, tmp_path):
    """DM learns no learning rates: its advice is a smaller --lr, never --distill-lr."""
    config = DistillConfig.for_method("dm", lr=1e9, iterations=5, eval_every=0, checkpoint_every=1,
                                      images_per_class=1, batch_size=16, field_epochs=1)
    with pytest.raises(DistillError, match="diverged") as caught:
        Distiller(config, dataset=digits32, progress=False).run(checkpoint_path=tmp_path / "c.npz")
    assert "--lr" in str(caught.value) and "--distill-lr" not in str(caught.value)
