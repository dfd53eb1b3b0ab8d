"""ddref.methods.dm: distribution matching (Zhao & Bilen 2023) — the embedding is the network
without its last layer, the loss is the per-class squared distance of mean embeddings, zero
when S = T, and its gradient matches finite differences."""

import numpy as np
import pytest
from autograd import grad

from ddref import nn
from ddref.methods import dm

K = 3

MODELS = [("mlp", (1, 4, 4), {"hidden": (8, 6)}), ("mlp", (1, 4, 4), {"hidden": ()}),
          ("lenet", (1, 28, 28), {}), ("lenet", (3, 32, 32), {}), ("convnet", (3, 32, 32), {}),
          ("convnet3", (1, 8, 8), {"width": 4}), ("convnet3", (3, 16, 16), {"width": 5})]


@pytest.mark.parametrize("name, shape, options", MODELS)
def test_embed_then_the_last_layer_is_the_network(rng, name, shape, options):
    model = nn.build_model(name, shape, K, **options)
    params = model.init(rng)
    x = rng.normal(size=(4, *shape))
    w, b = dm.head_keys(name, params)
    features = dm.embed(name, params, x)
    assert features.shape[1] == params[w].shape[0]
    np.testing.assert_array_equal(nn.dense(features, params[w], params[b]), model.apply(params, x))
    np.testing.assert_array_equal(dm.embed(model, params, x), features)   # a Model works too


def test_embed_names_the_models_it_knows(rng):
    model = nn.build_model("linear", (1, 4, 4), K)
    with pytest.raises(ValueError, match="DM has no embedding for model 'linear': choose one of mlp, lenet"):
        dm.embed("linear", model.init(rng), rng.normal(size=(2, 1, 4, 4)))


def small_problem(rng, model_name="mlp", n_syn=2, n_real=5):
    shape = (1, 4, 4) if model_name == "mlp" else (1, 28, 28)
    options = {"hidden": (12, 10)} if model_name == "mlp" else {}
    params = nn.build_model(model_name, shape, K, **options).init(rng)
    x_syn = rng.normal(size=(n_syn * K, *shape))
    x_real = rng.normal(size=(n_real * K, *shape))
    return params, x_syn, np.repeat(np.arange(K), n_syn), x_real, np.repeat(np.arange(K), n_real)


def test_loss_is_the_per_class_distance_of_mean_embeddings(rng):
    params, x_syn, y_syn, x_real, y_real = small_problem(rng)
    perm = rng.permutation(len(y_real))                       # classes interleaved in the batch
    x_real, y_real = x_real[perm], y_real[perm]
    expected = 0.0
    for c in range(K):
        mean_real = dm.embed("mlp", params, x_real[y_real == c]).mean(axis=0)
        mean_syn = dm.embed("mlp", params, x_syn[y_syn == c]).mean(axis=0)
        expected += np.sum((mean_real - mean_syn) ** 2)
    assert expected > 0
    assert dm.dm_loss("mlp", params, x_syn, y_syn, x_real, y_real, K) == pytest.approx(expected, rel=1e-13)


def test_classes_absent_from_the_synthetic_set_do_not_count(rng):
    params, x_syn, y_syn, x_real, y_real = small_problem(rng)
    only_0 = y_syn == 0
    full = dm.dm_loss("mlp", params, x_syn, y_syn, x_real, y_real, K)
    part = dm.dm_loss("mlp", params, x_syn[only_0], y_syn[only_0], x_real, y_real, K)
    assert 0 < part < full


@pytest.mark.parametrize("model_name", ["mlp", "lenet"])
def test_loss_is_zero_when_synthetic_set_is_the_real_batch(rng, model_name):
    params, _, _, x_real, y_real = small_problem(rng, model_name)
    assert dm.dm_loss(model_name, params, x_real, y_real, x_real, y_real, K) == 0.0
    changed = x_real.copy()
    changed[-1] += rng.normal(size=changed[-1].shape)
    assert dm.dm_loss(model_name, params, changed, y_real, x_real, y_real, K) > 1e-6


@pytest.mark.parametrize("model_name", ["mlp", "lenet"])
def test_gradient_wrt_synthetic_images_matches_finite_differences(rng, directional_check, model_name):
    params, x_syn, y_syn, x_real, y_real = small_problem(rng, model_name)

    def loss(x):
        return dm.dm_loss(model_name, params, x, y_syn, x_real, y_real, K)

    g = grad(loss)(x_syn)
    assert np.all(np.isfinite(g)) and np.linalg.norm(g) > 0
    directional_check(loss, g, x_syn, rng, tol=1e-7)


def test_loss_rejects_missing_classes_and_bad_labels(rng):
    params, x_syn, y_syn, x_real, y_real = small_problem(rng)
    keep = y_real != 1
    with pytest.raises(ValueError, match=r"no images of class\(es\) \[1\]"):
        dm.dm_loss("mlp", params, x_syn, y_syn, x_real[keep], y_real[keep], K)
    with pytest.raises(ValueError, match="y_real must lie in 0..2"):
        dm.dm_loss("mlp", params, x_syn, y_syn, x_real, y_real + 1, K)
