"""A distilled set used another way: in another step order, as a pool, by another network;
and distillation with a random step order."""

import copy

import numpy as np
import pytest

from ddref import data, reuse
from ddref.distill import DistillConfig, Distiller
from ddref.evaluate import train_on_steps
from ddref.losses import one_hot
from ddref.unroll import sgd_step


@pytest.fixture(scope="module")
def digits():
    return data.load("digits", dtype="float64")


@pytest.fixture(scope="module")
def distilled(digits):
    config = DistillConfig(steps=3, epochs=2, iterations=60, lr=0.05, batch_size=256,
                           eval_every=0, dtype="float64")
    return Distiller(config, dataset=digits, progress=False).run()


def test_the_learned_order_is_training_as_distilled(distilled):
    d = distilled
    a = reuse.train_on_ordered_steps(d.model, d.theta0, d.x, d.labels, d.lrs(), [0, 1, 2])
    b = train_on_steps(d.model.apply, d.theta0, d.x, one_hot(d.labels, 10), d.lrs())
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_a_shuffled_order_keeps_each_rate_at_its_position(distilled):
    d = distilled
    a = reuse.train_on_ordered_steps(d.model, d.theta0, d.x, d.labels, d.lrs(), [2, 0, 1])
    b = train_on_steps(d.model.apply, d.theta0, d.x[[2, 0, 1]], one_hot(d.labels, 10), d.lrs())
    c = reuse.train_on_ordered_steps(d.model, d.theta0, d.x, d.labels, d.lrs(), [0, 1, 2])
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert any(not np.allclose(a[k], c[k]) for k in a)


def test_a_pool_step_with_the_whole_pool_is_one_full_batch_step(distilled):
    d = distilled
    images = d.x.reshape(30, 1, 8, 8)
    labels = np.tile(d.labels, 3)
    pooled = reuse.train_on_pool(d.model, d.theta0, images, one_hot(labels, 10), batch_size=30,
                                 n_steps=1, lr=0.1, rng=np.random.default_rng(0))
    full = sgd_step(d.model.apply, d.theta0, images, one_hot(labels, 10), 0.1)
    for k in full:
        np.testing.assert_allclose(pooled[k], full[k], rtol=1e-10, atol=1e-12)


def soft_labels_for(d, seed=0):
    """Random label distributions (S, n, K) standing in for learned ones."""
    z = np.random.default_rng(seed).normal(size=(*d.x.shape[:2], 10))
    return np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)


def test_learned_labels_move_with_their_images(distilled):
    d, soft = distilled, soft_labels_for(distilled)
    a = reuse.train_on_ordered_steps(d.model, d.theta0, d.x, d.labels, d.lrs(), [2, 0, 1],
                                     soft_labels=soft)
    b = train_on_steps(d.model.apply, d.theta0, d.x[[2, 0, 1]], soft[[2, 0, 1]], d.lrs())
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_a_pool_of_images_with_learned_labels_trains_on_them(distilled, digits):
    d, soft = distilled, soft_labels_for(distilled)
    images, targets = d.x.reshape(30, 1, 8, 8), soft.reshape(30, 10)
    pooled = reuse.train_on_pool(d.model, d.theta0, images, targets, batch_size=30, n_steps=1,
                                 lr=0.1, rng=np.random.default_rng(0))
    full = sgd_step(d.model.apply, d.theta0, images, targets, 0.1)
    for k in full:
        np.testing.assert_allclose(pooled[k], full[k], rtol=1e-10, atol=1e-12)


def test_every_use_of_a_set_trains_with_its_learned_labels(distilled, digits):
    """learned order = evaluate_distilled with the soft labels; shuffled, pool and another
    architecture give other numbers with them than with the hard labels."""
    from ddref.evaluate import evaluate_distilled

    d, soft = distilled, soft_labels_for(distilled)
    learned, _ = reuse.order_accuracy("learned", d.model, digits, d.x, d.labels, d.lrs(), d.theta0,
                                      soft_labels=soft)
    assert learned == evaluate_distilled(d.model, digits, d.x, d.labels, d.lrs(), theta0=d.theta0,
                                         soft_labels=soft)
    for order in ("learned", "shuffled", "pool"):
        with_soft = reuse.order_accuracy(order, d.model, digits, d.x, d.labels, d.lrs(), d.theta0,
                                         soft_labels=soft)
        hard = reuse.order_accuracy(order, d.model, digits, d.x, d.labels, d.lrs(), d.theta0)
        assert with_soft[0].mean != hard[0].mean, order
    other = [reuse.other_architecture_accuracy("mlp", digits, d.x, d.labels, d.lrs(), n_inits=2,
                                               lr_grid=(0.1,), soft_labels=s) for s in (soft, None)]
    assert other[0]["learned_lrs"].mean != other[1]["learned_lrs"].mean


def test_every_order_is_measured(distilled, digits):
    d = distilled
    learned, _ = reuse.order_accuracy("learned", d.model, digits, d.x, d.labels, d.lrs(), d.theta0)
    shuffled, _ = reuse.order_accuracy("shuffled", d.model, digits, d.x, d.labels, d.lrs(), d.theta0)
    pool, lr = reuse.order_accuracy("pool", d.model, digits, d.x, d.labels, d.lrs(), d.theta0)
    assert learned == d.accuracy()
    assert shuffled.n == 10 and len(set(shuffled.values)) > 1
    assert lr in reuse.BASELINE_LR_GRID and pool.n == 1
    with pytest.raises(ValueError, match="--order must be one of"):
        reuse.order_accuracy("backwards", d.model, digits, d.x, d.labels, d.lrs(), d.theta0)


def test_padding_keeps_the_image_in_the_middle():
    x = np.arange(2 * 1 * 4 * 4, dtype=float).reshape(2, 1, 4, 4)
    padded = reuse.pad_images(x, (1, 8, 8), background=[-7.0])
    assert padded.shape == (2, 1, 8, 8)
    np.testing.assert_array_equal(padded[:, :, 2:6, 2:6], x)
    assert (padded[:, :, :2] == -7).all() and (padded[:, :, :, 6:] == -7).all()
    with pytest.raises(ValueError, match="cannot be padded"):
        reuse.pad_images(x, (1, 2, 2), background=[0.0])


def test_input_shapes_for_other_networks():
    assert reuse.input_shape_for("convnet", (1, 28, 28)) == (1, 32, 32)
    assert reuse.input_shape_for("lenet", (1, 8, 8)) == (1, 28, 28)
    assert reuse.input_shape_for("lenet", (1, 28, 28)) == (1, 28, 28)
    assert reuse.input_shape_for("mlp", (1, 8, 8)) == (1, 8, 8)


def test_another_architecture_is_trained_both_ways(distilled, digits):
    d = distilled
    result = reuse.other_architecture_accuracy("mlp", digits, d.x, d.labels, d.lrs(), n_inits=2,
                                               lr_grid=(0.01, 0.1))
    assert result["learned_lrs"].n == result["tuned_lr"].n == 2
    assert result["lr"] in (0.01, 0.1)
    assert result["tuned_lr"].mean > 0.3      # far above chance (0.1): the set carries over


def test_random_order_distillation_maps_the_gradient_back(digits):
    config = DistillConfig(steps=3, epochs=1, iterations=1, batch_size=64, dtype="float64",
                           eval_every=0, order="random")
    distiller = Distiller(config, dataset=digits, progress=False)
    twin = copy.deepcopy(distiller)
    loss, grad_x, _ = distiller.meta_gradient_in_order()

    order = twin.rng.permutation(3)          # the order the distiller drew
    twin.x = twin.x[order]
    twin_loss, twin_grad, _ = twin.meta_gradient()
    assert loss == twin_loss
    np.testing.assert_array_equal(grad_x[order], twin_grad)
    assert not np.array_equal(order, np.arange(3))   # (this seed draws a real permutation)
