"""Algorithm 1 as a whole: config checks, checkpoints and exact resume, divergence,
the distilled set on disk, and re-evaluation."""

import numpy as np
import pytest

from ddref import data, hypergrad
from ddref.distill import (DistillConfig, DistilledSet, DistillError, Distiller,
                           distilled_labels, held_out_accuracy)
from ddref.nn import ShapeError


@pytest.fixture(scope="module")
def digits():
    return data.load("digits", dtype="float64")


def small_config(**overrides):
    values = dict(steps=2, epochs=2, batch_size=64, iterations=6, dtype="float64",
                  eval_every=0, eval_inits=2, checkpoint_every=2, seed=3)
    values.update(overrides)
    return DistillConfig(**values)


def state_of(distiller):
    return distiller.x.copy(), distiller.raw_lrs.copy()


def test_labels_are_class_major():
    assert distilled_labels(3, 2).tolist() == [0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize("field,value,words", [
    ("init", "sometimes", "init must be one of"),
    ("engine", "magic", "engine must be one of"),
    ("steps", 0, "steps must be at least 1"),
    ("distill_lr", -0.1, "distill_lr must be positive"),
    ("dtype", "float16", "dtype must be"),
])
def test_bad_config_is_one_clear_error(field, value, words):
    with pytest.raises(ValueError, match=words):
        DistillConfig(**{field: value}).validate()


def test_unknown_config_key_is_rejected():
    with pytest.raises(ValueError, match="unknown config keys"):
        DistillConfig.from_dict({"stepz": 3})


def test_outer_loss_goes_down(digits):
    distiller = Distiller(small_config(iterations=40, batch_size=256, lr=0.03), dataset=digits,
                          progress=False).run()
    losses = distiller.history.losses
    assert len(losses) == 40
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])


def test_same_seed_same_run(digits):
    a = Distiller(small_config(iterations=3), dataset=digits, progress=False).run()
    b = Distiller(small_config(iterations=3), dataset=digits, progress=False).run()
    for u, v in zip(state_of(a), state_of(b)):
        np.testing.assert_array_equal(u, v)


@pytest.mark.parametrize("init", ["fixed", "random"])
def test_resume_gives_the_uninterrupted_result(digits, tmp_path, init):
    config = small_config(init=init, n_nets=2)
    whole = Distiller(config, dataset=digits, progress=False).run()

    checkpoint = tmp_path / "checkpoint.npz"
    first = Distiller(config, dataset=digits, progress=False)
    first.run(iterations=3, checkpoint_path=checkpoint)
    resumed = Distiller.from_checkpoint(checkpoint, dataset=digits, progress=False)
    assert resumed.iteration == 3
    resumed.run(checkpoint_path=checkpoint)

    assert resumed.iteration == whole.iteration == config.iterations
    for u, v in zip(state_of(whole), state_of(resumed)):
        np.testing.assert_array_equal(u, v)
    assert resumed.history.losses == whole.history.losses


def test_ctrl_c_writes_a_checkpoint_that_resumes_exactly(digits, tmp_path, monkeypatch):
    config = small_config()
    whole = Distiller(config, dataset=digits, progress=False).run()

    checkpoint = tmp_path / "checkpoint.npz"
    interrupted = Distiller(config, dataset=digits, progress=False)
    real_step = Distiller.step

    def step_then_interrupt(self):
        if self.iteration == 3:
            raise KeyboardInterrupt
        return real_step(self)

    monkeypatch.setattr(Distiller, "step", step_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        interrupted.run(checkpoint_path=checkpoint)
    monkeypatch.setattr(Distiller, "step", real_step)

    resumed = Distiller.from_checkpoint(checkpoint, dataset=digits, progress=False)
    assert resumed.iteration == 3
    resumed.run()
    for u, v in zip(state_of(whole), state_of(resumed)):
        np.testing.assert_array_equal(u, v)


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(digits, tmp_path, monkeypatch):
    checkpoint = tmp_path / "checkpoint.npz"
    distiller = Distiller(small_config(checkpoint_every=1), dataset=digits, progress=False)
    distiller.run(iterations=2, checkpoint_path=checkpoint)
    good_x = distiller.x.copy()

    def poisoned(*args, **kwargs):
        mg = real(*args, **kwargs)
        return hypergrad.MetaGradient(float("nan"), mg.grad_x, mg.grad_raw_lrs)

    real = hypergrad.meta_gradient
    monkeypatch.setattr(hypergrad, "meta_gradient", poisoned)
    with pytest.raises(DistillError, match="became NaN/inf at iteration 3.*diverged"):
        distiller.run(iterations=4, checkpoint_path=checkpoint)

    kept = Distiller.from_checkpoint(checkpoint, dataset=digits, progress=False)
    assert kept.iteration == 2
    np.testing.assert_array_equal(kept.x, good_x)


def test_a_diverging_learning_rate_is_named(digits):
    distiller = Distiller(small_config(distill_lr=1e4, steps=1, epochs=3), dataset=digits,
                          progress=False)
    with np.errstate(all="ignore"), pytest.raises(DistillError, match="diverged"):
        distiller.run(iterations=5)


def test_saved_set_reproduces_the_reported_accuracy(digits, tmp_path):
    distiller = Distiller(small_config(iterations=4), dataset=digits, progress=False).run()
    reported = distiller.accuracy()
    path = tmp_path / "distilled.npz"
    distiller.distilled_set().save(path)
    loaded = DistilledSet.load(path)
    assert loaded.theta0 is not None and loaded.config["steps"] == 2
    assert held_out_accuracy(loaded, dataset=digits) == reported


def test_random_init_accuracy_is_over_held_out_inits(digits):
    distiller = Distiller(small_config(init="random", iterations=2), dataset=digits,
                          progress=False).run()
    accuracy = distiller.accuracy(n_inits=3)
    assert accuracy.n == 3 and accuracy.std >= 0
    assert distiller.theta0 is None


def test_attack_objective_uses_relabelled_targets(digits):
    distiller = Distiller(small_config(objective="attack", source_class=3, target_class=8),
                          dataset=digits, progress=False)
    x, targets = distiller.sample_real_batch()
    # no real image is labelled 3 any more; the 3s now count as 8s
    assert targets[:, 3].sum() == 0
    assert targets.sum(axis=0)[8] > 0


def test_missing_key_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, images=np.zeros((1, 10, 1, 8, 8)))
    with pytest.raises(DistillError, match="lacks labels"):
        DistilledSet.load(path)


def test_corrupt_file_is_a_clear_error(digits, tmp_path):
    distiller = Distiller(small_config(iterations=1), dataset=digits, progress=False).run()
    path = tmp_path / "distilled.npz"
    distiller.distilled_set().save(path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DistillError, match="truncated or corrupt"):
        DistilledSet.load(path)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(DistillError, match="no distilled set at"):
        DistilledSet.load(tmp_path / "nothing.npz")


def test_images_that_do_not_fit_the_model(digits, tmp_path):
    distiller = Distiller(small_config(iterations=1), dataset=digits, progress=False).run()
    distilled = distiller.distilled_set()
    distilled.images = np.zeros((2, 10, 1, 28, 28))
    with pytest.raises(ShapeError, match="takes images of shape"):
        held_out_accuracy(distilled, dataset=digits)


def test_nan_training_data_is_refused(digits):
    broken = data.Dataset(digits.name, digits.x_train.copy(), digits.y_train, digits.x_test,
                          digits.y_test, digits.mean, digits.std, digits.classes)
    broken.x_train[0, 0, 0, 0] = np.nan
    with pytest.raises(data.DataError, match="NaN"):
        Distiller(small_config(), dataset=broken, progress=False)
