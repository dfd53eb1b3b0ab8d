"""The four baselines of Table 1: the images each makes, and how they are measured."""

import dataclasses

import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.neighbors import KNeighborsClassifier

from ddref import backend, baselines, data, evaluate, nn
from ddref.distill import distilled_labels
from ddref.losses import one_hot


@pytest.fixture(scope="module")
def digits():
    return data.load("digits")


@pytest.fixture(scope="module")
def mlp(digits):
    return nn.build_model("mlp", digits.image_shape, digits.num_classes)


def _class_of_each_image(digits, images):
    """The label of the training image each image equals (−1 when it is none of them)."""
    flat = digits.x_train.reshape(len(digits.x_train), -1)
    out = []
    for image in images.reshape(-1, flat.shape[1]):
        hits = np.flatnonzero((flat == image).all(axis=1))
        out.append(digits.y_train[hits[0]] if hits.size else -1)
    return np.array(out)


# an arbitrary x̃-shaped set: 3 steps, labels neither class-major nor one per class
ODD_LABELS = np.array([3, 1, 3, 7])


def test_random_real_images_are_training_images_of_the_slot_class(digits, rng):
    x = baselines.random_real_steps(digits, 3, ODD_LABELS, rng)
    assert x.shape == (3, 4, *digits.image_shape)
    assert (_class_of_each_image(digits, x).reshape(3, 4) == ODD_LABELS).all()


def test_average_images_are_the_class_means_in_every_slot(digits):
    x = baselines.average_steps(digits, 3, ODD_LABELS)
    assert x.shape == (3, 4, *digits.image_shape)
    for s in range(3):
        for j, c in enumerate(ODD_LABELS):
            np.testing.assert_allclose(x[s, j], digits.x_train[digits.y_train == c].mean(axis=0),
                                       rtol=1e-6)


def test_kmeans_images_are_the_centres_of_each_class(digits):
    x = baselines.kmeans_steps(digits, 3, ODD_LABELS, seed=5, n_init=2)
    assert x.shape == (3, 4, *digits.image_shape)
    for c, k in ((3, 6), (1, 3), (7, 3)):   # k = slots of the class per step × steps
        class_x = digits.x_train[digits.y_train == c]
        centres = KMeans(n_clusters=k, n_init=2, random_state=5).fit(
            class_x.reshape(len(class_x), -1).astype(np.float64)).cluster_centers_
        got = x[:, ODD_LABELS == c].reshape(k, -1)
        np.testing.assert_allclose(got, centres.astype(np.float32), rtol=1e-5, atol=1e-6)


def test_one_centre_per_class_is_the_class_average(digits):
    labels = distilled_labels(10, 1)
    np.testing.assert_allclose(baselines.kmeans_steps(digits, 1, labels, n_init=1),
                               baselines.average_steps(digits, 1, labels), rtol=1e-5, atol=1e-6)


def test_nearest_neighbour_matches_scikit_learn(digits, rng):
    x = baselines.random_real_steps(digits, 2, distilled_labels(10, 2), rng)
    labels = distilled_labels(10, 2)
    ours = baselines.nearest_neighbour_accuracy(x, labels, digits.x_test, digits.y_test)
    knn = KNeighborsClassifier(n_neighbors=1).fit(x.reshape(40, -1), np.tile(labels, 2))
    theirs = knn.score(digits.x_test.reshape(len(digits.x_test), -1), digits.y_test)
    assert ours == pytest.approx(theirs)
    # the test images themselves as examples classify the test split perfectly
    assert baselines.nearest_neighbour_accuracy(digits.x_test[None], digits.y_test, digits.x_test,
                                                digits.y_test) == 1.0


def test_the_learning_rate_is_tuned_on_the_training_split_not_the_test_split(digits, mlp):
    # test labels shifted by one: a network that learns scores ~0 on them, one that does not
    # learn (lr 1e-9) scores ~10%, so tuning on the test split would pick 1e-9
    shifted = dataclasses.replace(digits, y_test=(digits.y_test + 1) % 10)
    labels = distilled_labels(10, 1)
    theta0 = mlp.init(backend.rng(0), "float32")
    sets = baselines.baseline_sets("average", mlp, shifted, 2, 1, labels, [theta0])
    accuracy, lr = baselines.as_training_data(mlp, shifted, sets, labels, 1, [theta0],
                                              lr_grid=(1e-9, 0.3))
    assert lr == 0.3 and accuracy.mean < 0.1


def test_optimised_real_keeps_the_best_candidates_on_the_training_split(digits, mlp):
    labels = distilled_labels(10, 1)
    inits = [mlp.init(backend.rng(1), "float32")]
    rng = backend.rng(3)
    kept = baselines.optimised_real_sets(mlp, digits, 1, 1, labels, inits, 0.3, n_candidates=6,
                                         n_keep=2, rng=rng)
    rng = backend.rng(3)
    candidates = [baselines.random_real_steps(digits, 1, labels, rng) for _ in range(6)]
    targets = one_hot(labels, 10, "float32")

    def score(x):
        trained = baselines.train_pairs(mlp.apply, [(x, inits[0])], targets, 1, 0.3)[0]
        return evaluate.accuracy_on(mlp.apply, trained, digits.x_train, digits.y_train)

    scores = [score(x) for x in candidates]
    kept_scores = [score(x) for x in kept]
    assert kept_scores == sorted(scores, reverse=True)[:2]


def test_optimised_real_ranks_on_the_training_split_with_its_own_networks(digits, mlp):
    """Test labels shifted by one make the test-split ranking the reverse of the training-split
    one; the kept draws must be the training split's best (and differ from the test's)."""
    shifted = dataclasses.replace(digits, y_test=(digits.y_test + 1) % 10)
    labels = distilled_labels(10, 1)
    held_out = evaluate.held_out_inits(mlp, 2, 0, "float32")
    score_nets = baselines.scoring_inits(mlp, 2, 0, "float32")
    kept = baselines.optimised_real_sets(mlp, shifted, 1, 1, labels, score_nets, 0.3,
                                         n_candidates=8, n_keep=2, rng=backend.rng(7),
                                         eval_inits=held_out)
    rng = backend.rng(7)
    candidates = [baselines.random_real_steps(digits, 1, labels, rng) for _ in range(8)]
    targets = one_hot(labels, 10, "float32")

    def mean_accuracy(x, split):
        trained = baselines.train_pairs(mlp.apply, [(x, t) for t in score_nets], targets, 1, 0.3)
        xs, ys = (shifted.x_train, shifted.y_train) if split == "train" else (shifted.x_test, shifted.y_test)
        return np.mean(evaluate.accuracies_on(mlp.apply, trained, xs, ys))

    def best(split):
        return sorted(range(8), key=lambda i: -mean_accuracy(candidates[i], split))[:2]

    by_train, by_test = best("train"), best("test")
    assert set(by_train) != set(by_test)                 # the data make the two disagree
    kept_ids = [next(i for i, c in enumerate(candidates) if np.array_equal(c, x)) for x in kept]
    assert set(kept_ids) == set(by_train)


def test_optimised_real_refuses_to_rank_with_the_evaluation_networks(digits, mlp):
    labels = distilled_labels(10, 1)
    held_out = evaluate.held_out_inits(mlp, 2, 0, "float32")
    with pytest.raises(ValueError, match="needs its own scoring networks"):
        baselines.baseline_sets("optimised_real", mlp, digits, 1, 1, labels, held_out, n_draws=2)
    with pytest.raises(ValueError, match="include a network the baseline is evaluated on"):
        baselines.baseline_sets("optimised_real", mlp, digits, 1, 1, labels, held_out, n_draws=2,
                                score_inits=evaluate.held_out_inits(mlp, 1, 0, "float32"))


@pytest.mark.parametrize("name", baselines.BASELINES)
def test_each_baseline_fixed_and_random_init(digits, mlp, name):
    labels = distilled_labels(10, 1)
    fixed = [mlp.init(backend.rng(0), "float32")]
    held_out = evaluate.held_out_inits(mlp, 3, 0, "float32")
    options = dict(n_draws=3, tune_draws=2, n_candidates=4, kmeans_draws=2, kmeans_n_init=1,
                   lr_grid=(0.03, 0.3), score_inits=baselines.scoring_inits(mlp, 2, 0, "float32"))
    for inits in (fixed, held_out):
        result = baselines.run_baseline(name, mlp, digits, 2, 2, labels, inits, **options)
        again = baselines.run_baseline(name, mlp, digits, 2, 2, labels, inits, **options)
        assert result == again                          # seeded: the same numbers twice
        assert result.n_images == 20 and result.lr in (0.03, 0.3)
        # n = (image set, network) pairs: draws × the one θ0, or one network per draw
        draws = {"average": 1, "kmeans": 2}.get(name, 3)
        assert result.training.n == (draws if inits is fixed else 3)
        assert result.nearest_neighbour.n == draws
        assert result.training.mean > 0.3 and result.nearest_neighbour.mean > 0.3   # chance: 0.1


def test_random_real_baseline_uses_the_distilled_evaluation_networks(digits, mlp, monkeypatch):
    seen = []
    original = baselines.train_pairs

    def spy(apply, pairs, targets, epochs, lr, momentum=0.0):
        seen.extend(theta0 for _, theta0 in pairs)
        return original(apply, pairs, targets, epochs, lr, momentum)

    monkeypatch.setattr(baselines, "train_pairs", spy)
    accuracy, lr = baselines.random_real_baseline(mlp, digits, 1, 1, distilled_labels(10, 1),
                                                 n_draws=3, seed=4)
    assert accuracy.n == 3 and lr in evaluate.BASELINE_LR_GRID
    nets = evaluate.held_out_inits(mlp, 3, 4, "float32")
    assert all(any(np.array_equal(s["w0"], n["w0"]) for n in nets) for s in seen)


def test_bad_slots_are_one_clear_sentence(digits, mlp):
    with pytest.raises(ValueError, match="labels must lie in 0..9"):
        baselines.average_steps(digits, 1, np.array([0, 10]))
    with pytest.raises(ValueError, match="class 0 needs 1500 images"):
        baselines.random_real_steps(digits, 1500, np.array([0]), backend.rng(0))
    with pytest.raises(ValueError, match="unknown baseline 'median'"):
        baselines.baseline_sets("median", mlp, digits, 1, 1, np.array([0]), [None])


def test_a_diverging_grid_value_is_never_chosen_and_warns_nothing(digits, mlp):
    import warnings

    labels = distilled_labels(10, 1)
    theta0 = mlp.init(backend.rng(0), "float32")
    pairs = [(baselines.average_steps(digits, 2, labels), theta0)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lr = baselines.tune_lr(mlp.apply, pairs, one_hot(labels, 10, "float32"), 3,
                               digits.x_train, digits.y_train, lr_grid=(0.3, 1e30))
    assert lr == 0.3


def test_baselines_and_attack_run_on_the_strict_fake_device_and_agree(digits, mlp):
    from ddref import _cupy, attack

    try:
        from fake_device import FakeArray, fake_xp
    except ImportError:
        from tests.fake_device import FakeArray, fake_xp
    labels = distilled_labels(10, 1)

    def measure():
        inits = evaluate.held_out_inits(mlp, 2, 0, "float64")
        baseline = baselines.run_baseline("kmeans", mlp, digits, 2, 1, labels, inits, n_draws=2,
                                          tune_draws=1, kmeans_draws=1, kmeans_n_init=1,
                                          lr_grid=(0.1, 1e30))
        report = attack.attack_report(mlp, digits, baselines.average_steps(digits, 2, labels),
                                      labels, np.full((1, 2), 0.1), inits, 0, 1, n_draws=2,
                                      tune_draws=1, lr_grid=(0.1,))
        return baseline, report

    on_host = measure()
    _cupy.install(fake_xp, FakeArray)
    with backend._using_namespace("fake", fake_xp):
        on_device = measure()
    assert on_device == on_host
