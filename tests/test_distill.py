"""Algorithm 1 as a whole: config checks, checkpoints and exact resume, divergence,
the distilled set on disk, and re-evaluation."""

import numpy as np
import pytest

from ddref import data, engines, hypergrad
from ddref.distill import (DistillConfig, DistilledSet, DistillError, Distiller,
                           distilled_labels, held_out_accuracy)
from ddref.baselines import random_real_baseline
from ddref.evaluate import Adam, sample_real_steps
from ddref.nn import ShapeError
from ddref.saved import SavedFileError


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
    ("init", "sometimes", "--init must be one of"),
    ("engine", "magic", "--engine must be one of"),
    ("steps", 0, "--steps must be at least 1"),
    ("distill_lr", -0.1, "--distill-lr must be a positive finite number"),
    ("dtype", "float16", "--dtype must be"),
    ("betas", (1.0, 0.999), r"--betas must be two numbers in \[0, 1\)"),
    ("betas", (-0.1, 0.999), r"--betas must be two numbers in \[0, 1\)"),
    ("lr", float("inf"), "--lr .*positive finite"),
    ("lr", float("nan"), "--lr .*positive finite"),
    ("lr_decay", 0.0, r"--lr-decay must be in \(0, 1\]"),
    ("lr_decay", -0.5, r"--lr-decay must be in \(0, 1\]"),
    ("decay_every", -1, "--decay-every must be 0 or more"),
    ("eval_every", -1, "--eval-every must be 0 or more"),
    ("checkpoint_every", -5, "--checkpoint-every must be 0 or more"),
    ("init_scale", 0.0, "--init-scale must be a positive"),
    ("seed", -1, "--seed must be an integer"),
    ("eval_inits", 0, "--eval-inits must be at least 1"),
    ("n_nets", 0, "--n-nets must be at least 1"),
    ("n_nets", 4, "--n-nets only applies to a random init"),
    ("dataset", "imagenet", "--dataset must name a data set"),
    ("model", "resnet", "--model must be one of"),
    ("init_scheme", "orthogonal", "--init-scheme must be one of"),
    ("steps", 2.5, "--steps must be int"),
    ("steps", "10", "--steps must be int"),
])
def test_bad_config_is_one_clear_error(field, value, words):
    with pytest.raises(ValueError, match=words):
        DistillConfig(**{field: value}).validate()


def test_attack_classes_must_be_classes_of_the_data_set(digits):
    with pytest.raises(ValueError, match="--target-class must differ"):
        DistillConfig(objective="attack", source_class=2, target_class=2).validate()
    with pytest.raises(ValueError, match="--source-class 12 is not a class of digits"):
        Distiller(small_config(objective="attack", source_class=12), dataset=digits, progress=False)


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
    config = small_config(init=init, n_nets=2 if init == "random" else 1)
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

    real = engines.mean_meta_gradient
    monkeypatch.setattr(engines, "mean_meta_gradient", poisoned)
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
    assert accuracy.n == 3 and accuracy.std > 0      # three different networks, three accuracies
    assert distiller.theta0 is None


def test_random_init_draws_a_new_theta0_every_time(digits):
    distiller = Distiller(small_config(init="random"), dataset=digits, progress=False)
    first, second = distiller.sample_theta0(), distiller.sample_theta0()
    assert all(not np.array_equal(first[k], second[k]) for k in first if first[k].ndim > 1)
    fixed = Distiller(small_config(init="fixed"), dataset=digits, progress=False)
    assert fixed.sample_theta0() is fixed.sample_theta0()


def test_meta_gradient_is_the_mean_over_n_nets(digits, monkeypatch):
    """Distiller.meta_gradient over n_nets networks equals the mean of one-network
    meta-gradients at the very θ0s and real batches it drew."""
    distiller = Distiller(small_config(init="random", n_nets=3), dataset=digits, progress=False)
    drawn_theta0, drawn_batches = [], []
    sample_theta0, sample_batch = distiller.sample_theta0, distiller.sample_real_batch
    monkeypatch.setattr(distiller.objective, "sample_theta0",
                        lambda: drawn_theta0.append(sample_theta0()) or drawn_theta0[-1])
    monkeypatch.setattr(distiller.objective, "sample_real_batch",
                        lambda: drawn_batches.append(sample_batch()) or drawn_batches[-1])
    loss, grad_x, grad_raw = distiller.meta_gradient()
    assert len(drawn_theta0) == len(drawn_batches) == 3
    singles = [engines.meta_gradient("backgrad", distiller.model.apply, theta0, distiller.x,
                                       distiller.targets, distiller.raw_lrs, x_real, targets)
               for theta0, (x_real, targets) in zip(drawn_theta0, drawn_batches)]
    np.testing.assert_allclose(loss, np.mean([m.loss for m in singles]), rtol=1e-12)
    np.testing.assert_allclose(grad_x, np.mean([m.grad_x for m in singles], axis=0), rtol=1e-9, atol=1e-14)
    np.testing.assert_allclose(grad_raw, np.mean([m.grad_raw_lrs for m in singles], axis=0),
                               rtol=1e-9, atol=1e-14)


def test_adam_matches_its_formula():
    params, grads = {"p": np.array([1.0, -2.0])}, [np.array([0.5, -1.0]), np.array([0.1, 0.3])]
    adam = Adam(params, lr=0.1, betas=(0.5, 0.9), eps=1e-8)
    m, v, p = np.zeros(2), np.zeros(2), params["p"].copy()
    for t, g in enumerate(grads, start=1):
        params = adam.step(params, {"p": g})
        m, v = 0.5 * m + 0.5 * g, 0.9 * v + 0.1 * g ** 2
        p = p - 0.1 * (m / (1 - 0.5 ** t)) / (np.sqrt(v / (1 - 0.9 ** t)) + 1e-8)
        np.testing.assert_allclose(params["p"], p, rtol=1e-15)


def test_outer_lr_decays_every_decay_every_iterations(digits):
    distiller = Distiller(small_config(lr=0.04, lr_decay=0.5, decay_every=3), dataset=digits,
                          progress=False)
    seen = []
    for _ in range(7):
        seen.append(distiller.outer_lr())
        distiller.step()
    assert seen == [0.04] * 3 + [0.02] * 3 + [0.01]
    assert distiller.adam.lr == 0.01    # the 7th step used the twice-decayed rate


def test_random_real_baseline_draws_real_images_of_the_right_classes(digits):
    labels = distilled_labels(10, 2)
    rng = np.random.default_rng(0)
    x = sample_real_steps(digits, 3, labels, rng)
    assert x.shape == (3, 20, 1, 8, 8)
    for step in x:
        for image, label in zip(step, labels):
            matches = np.flatnonzero((digits.x_train == image).all(axis=(1, 2, 3)))
            assert matches.size and (digits.y_train[matches] == label).any()


def test_distilled_images_beat_random_real_ones(digits):
    distiller = Distiller(DistillConfig(steps=1, epochs=3, iterations=60, lr=0.05, batch_size=256,
                                        eval_every=0, dtype="float64"),
                          dataset=digits, progress=False).run()
    distilled = distiller.accuracy()
    baseline, lr = random_real_baseline(distiller.model, digits, 1, 3, distiller.labels,
                                        theta0=distiller.theta0, n_draws=5, dtype="float64")
    assert baseline.n == 5 and baseline.std > 0 and lr in (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
    assert distilled.mean > baseline.mean + 3 * baseline.std, (distilled, baseline)


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
    with pytest.raises(SavedFileError, match="lacks labels"):
        DistilledSet.load(path)


def test_corrupt_file_is_a_clear_error(digits, tmp_path):
    distiller = Distiller(small_config(iterations=1), dataset=digits, progress=False).run()
    path = tmp_path / "distilled.npz"
    distiller.distilled_set().save(path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(SavedFileError, match="truncated or corrupt"):
        DistilledSet.load(path)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(SavedFileError, match="no distilled set at"):
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
