"""ddref.protocol: the field's evaluation protocol (DC's evaluate_synset).

* the recipe: DC's numbers, its learning-rate step and momentum restart, every parameter in
  metrics.json, each bad option refused with one sentence;
* the training loop against an independent transcription of PyTorch's SGD as DC drives it
  (float64), and the stacked K-network path against the plain loop;
* seeds: same seed → same numbers, network k independent of K;
* no test image used for anything but the final score: a test split that refuses to be read
  during training, and a poisoned one (and a poisoned training split) that leaves the trained
  networks unchanged;
* it learns, on hard and on soft labels, with mlp, lenet and convnet3.
"""

import json

import autograd.numpy as anp
import numpy as np
import pytest
from autograd import grad

from ddref import fused, losses, nn, protocol
from ddref.data import Dataset
from ddref.protocol import Recipe

CLASSES = 3
SHAPE = (1, 4, 4)


def blobs(rng, n, shape=SHAPE, classes=CLASSES, spread=0.5, centres=None):
    """n images of ``classes`` Gaussian blobs around fixed class centres (learnable)."""
    if centres is None:
        centres = np.random.default_rng(99).normal(size=(classes, *shape))
    y = np.arange(n) % classes
    return centres[y] + spread * rng.normal(size=(n, *shape)), y


def make_dataset(rng, n_test=60, shape=SHAPE, classes=CLASSES, name="blobs"):
    x_train, y_train = blobs(rng, 30, shape, classes)
    x_test, y_test = blobs(rng, n_test, shape, classes)
    return Dataset(name, x_train, y_train, x_test, y_test, np.zeros(shape[0]), np.ones(shape[0]),
                   tuple(str(c) for c in range(classes)))


def tiny_recipe(**changes):
    base = dict(epochs=6, batch_size=4, n_nets=3, dtype="float64", lr=0.05)
    return Recipe(**{**base, **changes})


# ---------------------------------------------------------------------------- the recipe


def test_defaults_are_dcs():
    r = Recipe()
    assert (r.lr, r.momentum, r.weight_decay, r.batch_size, r.lr_decay) == (0.01, 0.9, 5e-4, 256, 0.1)
    assert r.epochs == 300 and r.passes == 301 and r.decay_after == 151
    assert r.augmentation == "none"


def test_learning_rate_steps_once_after_pass_epochs_half_plus_one():
    r = Recipe(epochs=6, lr=1.0)                 # DC: range(7) passes, decay after ep == 4
    assert [r.lr_of_pass(p) for p in range(r.passes)] == [1.0] * 5 + [0.1] * 2


def test_recipe_goes_into_metrics_json():
    d = Recipe().to_dict()
    assert json.loads(json.dumps(d)) == d
    for name in ("epochs", "lr", "lr_decay", "momentum", "weight_decay", "batch_size", "n_nets",
                 "augmentation", "init_scheme", "dtype", "passes", "lr_decay_after_pass", "source"):
        assert name in d, name
    assert d["protocol"] == "field" and "evaluate_synset" in d["source"]


@pytest.mark.parametrize("option,value", [("epochs", -1), ("epochs", 2.5), ("lr", 0.0),
                                          ("lr_decay", 0.0), ("momentum", 1.0), ("weight_decay", -1e-4),
                                          ("batch_size", 0), ("n_nets", 0), ("augmentation", "dsa"),
                                          ("dtype", "float16")])
def test_bad_options_are_refused_by_name(option, value):
    with pytest.raises(ValueError, match=f"the field protocol's {option}="):
        Recipe(**{option: value}).check()


def test_minibatches_cover_the_pool_once_and_keep_the_last_partial_batch(rng):
    batches = protocol.minibatches(rng, 10, 4)
    assert [len(b) for b in batches] == [4, 4, 2]
    assert sorted(np.concatenate(batches)) == list(range(10))
    assert [len(b) for b in protocol.minibatches(rng, 3, 256)] == [3]


# ---------------------------------------------------------------------------- the training loop


def reference_training(model, images, labels, recipe, seed, k):
    """DC's evaluate_synset transcribed independently, PyTorch's SGD semantics included: the
    buffer starts as the first gradient, the optimiser is rebuilt (buffer dropped) when the
    rate steps down; gradients by plain autograd on the model."""
    rng = protocol.network_rng(seed, k)
    theta = model.init(rng, dtype=recipe.dtype, scheme=recipe.init_scheme)
    targets = losses.one_hot(labels, model.num_classes)
    lr, buffers = recipe.lr, None

    def loss(theta, x, t):
        return losses.cross_entropy(model.apply(theta, x), t)

    for ep in range(recipe.epochs + 1):
        order = rng.permutation(len(images))
        for start in range(0, len(images), recipe.batch_size):
            idx = order[start: start + recipe.batch_size]
            g = grad(loss)(theta, images[idx], targets[idx])
            d_p = {n: g[n] + recipe.weight_decay * theta[n] for n in theta}
            buffers = d_p if buffers is None else {n: recipe.momentum * buffers[n] + d_p[n] for n in theta}
            theta = {n: theta[n] - lr * buffers[n] for n in theta}
        if ep in [recipe.epochs // 2 + 1]:
            lr *= recipe.lr_decay
            buffers = None                      # a new torch.optim.SGD
    return theta


@pytest.mark.parametrize("name,shape", [("mlp", SHAPE), ("convnet3", (1, 8, 8))])
def test_training_matches_an_independent_transcription_of_dc(rng, rel_err, name, shape):
    options = {"width": 3} if name == "convnet3" else {"hidden": (5,)}
    model = nn.build_model(name, shape, CLASSES, **options)
    images, labels = blobs(rng, 10, shape)
    recipe = tiny_recipe(n_nets=1, epochs=5)
    _, targets = protocol.training_targets(model, images, labels, dtype="float64")
    got = protocol.train_network(model, images, targets, recipe, protocol.network_rng(7, 0))
    want = reference_training(model, images, labels, recipe, 7, 0)
    for n in want:      # absolute floor: convnet3's conv biases stay at rounding level (≈1e-17)
        assert np.abs(got[n] - want[n]).max() < 1e-12 * (1 + np.abs(want[n]).max()), n
    assert rel_err(got["fw" if name == "convnet3" else "w0"], want["fw" if name == "convnet3" else "w0"]) < 1e-12


def test_stacked_networks_equal_the_plain_loop(rng, rel_err):
    """The batched path (the MLP's K networks side by side) gives the plain loop's parameters
    and the same accuracies, in float64."""
    model = nn.build_model("mlp", SHAPE, CLASSES, hidden=(6,))
    assert fused.gradient_for(model.apply, losses.cross_entropy).stackable
    data = make_dataset(rng)
    images, labels = blobs(rng, 10)
    recipe = tiny_recipe(n_nets=4)
    plain = protocol.evaluate(model, data, images, labels, recipe, seed=3, stacked=False)
    stacked = protocol.evaluate(model, data, images, labels, recipe, seed=3, stacked=True)
    for a, b in zip(plain.networks, stacked.networks):
        for n in a:
            assert rel_err(a[n], b[n]) < 1e-10, n
    assert plain.accuracy.values == stacked.accuracy.values
    assert len(set(plain.accuracy.values)) > 1 or plain.accuracy.mean == 1.0


def test_stacked_path_refuses_a_model_that_cannot_stack(rng):
    model = nn.build_model("convnet3", (1, 8, 8), CLASSES, width=2)
    images, labels = blobs(rng, 6, (1, 8, 8))
    _, targets = protocol.training_targets(model, images, labels)
    with pytest.raises(ValueError, match="no stacked fast path"):
        protocol.train_networks(model, images, targets, tiny_recipe(), stacked=True)


# ---------------------------------------------------------------------------- seeds


def test_same_seed_same_numbers_other_seed_other_numbers(rng):
    model = nn.build_model("mlp", SHAPE, CLASSES, hidden=(6,))
    data = make_dataset(rng)
    images, labels = blobs(rng, 9)
    a = protocol.evaluate(model, data, images, labels, tiny_recipe(), seed=1)
    b = protocol.evaluate(model, data, images, labels, tiny_recipe(), seed=1)
    c = protocol.evaluate(model, data, images, labels, tiny_recipe(), seed=2)
    assert a.accuracy == b.accuracy
    assert not np.array_equal(a.networks[0]["w0"], c.networks[0]["w0"])


@pytest.mark.parametrize("stacked", [False, True])
def test_network_k_does_not_depend_on_k(rng, stacked):
    model = nn.build_model("mlp", SHAPE, CLASSES, hidden=(6,))
    images, labels = blobs(rng, 9)
    _, targets = protocol.training_targets(model, images, labels, dtype="float64")
    two = protocol.train_networks(model, images, targets, tiny_recipe(n_nets=2), 5, stacked=stacked)
    three = protocol.train_networks(model, images, targets, tiny_recipe(n_nets=3), 5, stacked=stacked)
    for n in two[1]:
        np.testing.assert_allclose(two[1][n], three[1][n], rtol=0, atol=1e-13)
    assert not np.array_equal(two[0]["w0"], two[1]["w0"])


# ---------------------------------------------------------------------------- the test split


class GuardedDataset:
    """A data set whose test split refuses to be read until ``open`` is set (once training is
    over), and whose training split refuses to be read at all (the protocol trains on the pool
    only)."""

    def __init__(self, data):
        self._data, self.open, self.reads = data, False, 0
        self.name, self.classes, self.num_classes = data.name, data.classes, data.num_classes

    def _test(self, field):
        if not self.open:
            raise AssertionError(f"the test split's {field} was read before training was over")
        self.reads += 1
        return getattr(self._data, field)

    x_test = property(lambda self: self._test("x_test"))
    y_test = property(lambda self: self._test("y_test"))

    @property
    def x_train(self):
        raise AssertionError("the protocol read the data set's training split")

    y_train = x_train


@pytest.mark.parametrize("stacked", [False, True])
def test_test_split_is_not_read_during_training(rng, monkeypatch, stacked):
    data = GuardedDataset(make_dataset(rng))
    inner = protocol.train_networks

    def guarded(*args, **kwargs):
        nets = inner(*args, **kwargs)
        data.open = True                         # the test split may be read from now on
        return nets

    monkeypatch.setattr(protocol, "train_networks", guarded)
    model = nn.build_model("mlp", SHAPE, CLASSES, hidden=(6,))
    result = protocol.evaluate(model, data, *blobs(rng, 9), tiny_recipe(), stacked=stacked)
    assert data.reads >= 2 and result.accuracy.n == 3     # read once training was over


def test_poisoned_splits_do_not_change_the_trained_networks(rng):
    """The same pool, scored against a clean data set and against one whose test split (and
    training split) is poisoned: the trained networks are identical, only the scores differ —
    and the poisoned scores are the clean networks' accuracy on the poisoned test split."""
    clean = make_dataset(rng)
    poison = Dataset("poison", rng.normal(size=clean.x_train.shape) * 100, (clean.y_train + 1) % CLASSES,
                     clean.x_test[::-1] * -1.0, (clean.y_test[::-1] + 1) % CLASSES, clean.mean,
                     clean.std, clean.classes)
    model = nn.build_model("mlp", SHAPE, CLASSES, hidden=(6,))
    images, labels = blobs(rng, 9)
    a = protocol.evaluate(model, clean, images, labels, tiny_recipe(epochs=30))
    b = protocol.evaluate(model, poison, images, labels, tiny_recipe(epochs=30))
    for net_a, net_b in zip(a.networks, b.networks):
        for n in net_a:
            np.testing.assert_array_equal(net_a[n], net_b[n])
    assert a.accuracy.mean > 0.8 and b.accuracy.mean < a.accuracy.mean
    again = [losses.accuracy(model.apply(net, poison.x_test), poison.y_test) for net in a.networks]
    assert list(b.accuracy.values) == again


# ---------------------------------------------------------------------------- it learns


@pytest.mark.parametrize("name,shape,options", [("mlp", SHAPE, {"hidden": (16,)}),
                                                ("convnet3", (1, 8, 8), {"width": 4}),
                                                ("lenet", (1, 28, 28), {})])
def test_networks_trained_on_a_small_pool_generalise(rng, name, shape, options):
    model = nn.build_model(name, shape, CLASSES, **options)
    data = make_dataset(rng, shape=shape)
    images, labels = blobs(rng, 12, shape)
    recipe = Recipe(epochs=20 if name != "lenet" else 10, batch_size=8, n_nets=2, lr=0.05)
    result = protocol.evaluate(model, data, images, labels, recipe, seed=0)
    assert result.accuracy.n == 2 and result.accuracy.mean > 0.9, str(result.accuracy)
    d = result.to_dict()
    assert json.loads(json.dumps(d)) == d and d["recipe"]["epochs"] == recipe.epochs
    assert d["n_images"] == 12 and d["seconds_train"] > 0


def test_one_hot_soft_labels_are_the_hard_labels_and_other_soft_labels_differ(rng):
    model = nn.build_model("mlp", SHAPE, CLASSES, hidden=(6,))
    data = make_dataset(rng)
    images, labels = blobs(rng, 9)
    hard = protocol.evaluate(model, data, images, labels, tiny_recipe())
    soft = protocol.evaluate(model, data, images, labels, tiny_recipe(),
                             soft_labels=losses.one_hot(labels, CLASSES))
    for a, b in zip(hard.networks, soft.networks):
        np.testing.assert_array_equal(a["w0"], b["w0"])
    smooth = 0.6 * losses.one_hot(labels, CLASSES) + 0.4 / CLASSES
    other = protocol.evaluate(model, data, images, labels, tiny_recipe(), soft_labels=smooth)
    assert not np.allclose(hard.networks[0]["w0"], other.networks[0]["w0"])


@pytest.mark.parametrize("stacked", [False, True])
def test_float32_recipe_trains_float32_networks(rng, stacked):
    model = nn.build_model("mlp", SHAPE, CLASSES, hidden=(6,))
    result = protocol.evaluate(model, make_dataset(rng), *blobs(rng, 9), tiny_recipe(dtype="float32"),
                               stacked=stacked)
    assert all(v.dtype == np.float32 for net in result.networks for v in net.values())


def test_lenet_uses_the_fast_gradient():
    model = nn.build_model("lenet", (1, 28, 28), 10)
    assert fused.gradient_for(model.apply, losses.cross_entropy) is not None


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("images,labels,soft,match", [
    (np.zeros((4, 1, 5, 5)), np.arange(4) % 3, None, "takes images of shape"),
    (np.zeros((4, 16)), np.arange(4) % 3, None, r"shaped \(N, C, H, W\)"),
    (np.zeros((0, *SHAPE)), np.zeros(0, int), None, "N ≥ 1"),
    (np.full((4, *SHAPE), np.nan), np.arange(4) % 3, None, "NaN or inf"),
    (np.zeros((4, *SHAPE)), np.arange(3), None, "labels must be 4 whole numbers"),
    (np.zeros((4, *SHAPE)), np.zeros(4), None, "labels must be 4 whole numbers"),
    (np.zeros((4, *SHAPE)), np.arange(4), None, "labels must lie in 0..2"),
    (np.zeros((4, *SHAPE)), np.arange(4) % 3, np.ones((4, 5)), "soft_labels must be"),
])
def test_bad_pools_are_refused_before_training(rng, images, labels, soft, match):
    model = nn.build_model("mlp", SHAPE, CLASSES)
    with pytest.raises(ValueError, match=match):
        protocol.evaluate(model, make_dataset(rng), images, labels, tiny_recipe(), soft_labels=soft)
