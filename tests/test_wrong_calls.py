"""Wrong calls to the library's public functions (issue 22, item 9): each raises one clear
ValueError sentence — never a raw numpy error (broadcast, reshape of an empty batch,
IndexError, KeyError, ZeroDivisionError) and never a silent wrong answer."""

import numpy as np
import pytest

from ddref import attack, backend, baselines, data, evaluate, labels, losses, nn, reuse, unroll


@pytest.fixture(scope="module")
def world():
    digits = data.load("digits")
    mlp = nn.build_model("mlp", digits.image_shape, digits.num_classes)
    theta0 = mlp.init(backend.rng(0), "float64")
    x = np.zeros((2, 3, *digits.image_shape))
    return digits, mlp, theta0, x


TARGETS = losses.one_hot(np.array([0, 1, 2]), 10)

WRONG_CALLS = [
    # losses
    ("one_hot float label 1.5", lambda w: losses.one_hot(np.array([0, 1.5]), 10), "whole class numbers"),
    ("one_hot num_classes=0", lambda w: losses.one_hot(np.array([], dtype=int), 0), "num_classes must be"),
    ("one_hot num_classes=2.5", lambda w: losses.one_hot(np.array([0]), 2.5), "num_classes must be"),
    ("one_hot 2-D labels", lambda w: losses.one_hot(np.zeros((2, 2), dtype=int), 3), "shape \\(N,\\)"),
    ("one_hot label 10 of 10", lambda w: losses.one_hot(np.array([10]), 10), "must lie in 0..9"),
    ("cross_entropy empty batch", lambda w: losses.cross_entropy(np.zeros((0, 10)), np.zeros((0, 10))),
     "N ≥ 1"),
    ("cross_entropy targets of another shape", lambda w: losses.cross_entropy(np.zeros((3, 10)),
                                                                               np.zeros((2, 10))),
     "targets of the same shape"),
    ("accuracy with too few labels", lambda w: losses.accuracy(np.zeros((3, 10)), np.array([0])),
     "N labels"),
    ("accuracy of nothing", lambda w: losses.accuracy(np.zeros((0, 10)), np.array([])), "N ≥ 1"),
    # labels
    ("initial_logits confidence=1.0", lambda w: labels.initial_logits(np.array([0, 1]), 10, 2,
                                                                      confidence=1.0), "strictly between 0 and 1"),
    ("initial_logits confidence=0", lambda w: labels.initial_logits(np.array([0, 1]), 10, 2,
                                                                    confidence=0), "strictly between 0 and 1"),
    ("initial_logits steps=0", lambda w: labels.initial_logits(np.array([0, 1]), 10, 0), "steps must be"),
    ("assigned_labels no images", lambda w: labels.assigned_labels(10, 0), "at least one image"),
    # unroll
    ("unroll with a negative lr", lambda w: unroll.unroll(w[1].apply, w[2], w[3], TARGETS,
                                                          np.array([[0.1, -0.2]])), "must be 0 or more"),
    ("unroll lrs of the wrong shape", lambda w: unroll.unroll(w[1].apply, w[2], w[3], TARGETS,
                                                              np.ones((1, 3))), "do not fit 2 groups"),
    ("unroll images without a step axis", lambda w: unroll.unroll(w[1].apply, w[2], w[3][0], TARGETS,
                                                                  np.ones((1, 2))), "lack the step axis"),
    # evaluate
    ("train_on_steps negative lr with momentum", lambda w: evaluate.train_on_steps(
        w[1].apply, w[2], w[3], TARGETS, np.array([[0.1, -0.2]]), momentum=0.9), "must be 0 or more"),
    ("train_many negative lr, stacked", lambda w: evaluate.train_many(
        w[1].apply, [w[2], w[2]], w[3], TARGETS, np.array([[0.1, -0.2]])), "must be 0 or more"),
    ("train_many no networks", lambda w: evaluate.train_many(w[1].apply, [], w[3], TARGETS,
                                                             np.ones((1, 2))), "no networks to train"),
    ("evaluate_distilled n_inits=0", lambda w: evaluate.evaluate_distilled(
        w[1], w[0], w[3], np.array([0, 1, 2]), np.ones((1, 2)), n_inits=0), "n_inits must be"),
    ("held_out_inits n=-1", lambda w: evaluate.held_out_inits(w[1], -1, 0, "float64"), "n_inits must be"),
    ("Accuracy.of nothing", lambda w: evaluate.Accuracy.of([]), "one or more"),
    ("predict on no images", lambda w: evaluate.predict(w[1].apply, w[2], w[0].x_test[:0]), "x is empty"),
    ("accuracies_on with too few labels", lambda w: evaluate.accuracies_on(
        w[1].apply, [w[2]], w[0].x_test, w[0].y_test[:5]), "as many labels as images"),
    # baselines
    ("nearest neighbour with too few labels", lambda w: baselines.nearest_neighbour_accuracy(
        w[3], np.array([0]), w[0].x_test, w[0].y_test), "one class per image of a step"),
    ("nearest neighbour with no test images", lambda w: baselines.nearest_neighbour_accuracy(
        w[3], np.array([0, 1, 2]), w[0].x_test[:0], w[0].y_test[:0]), "at least one image"),
    ("nearest neighbour, test images of another shape", lambda w: baselines.nearest_neighbour_accuracy(
        w[3], np.array([0, 1, 2]), w[0].x_test[:, :, :4], w[0].y_test), "shaped like the stored"),
    ("pairs_of no sets", lambda w: baselines.pairs_of([], [w[2]]), "at least one image set"),
    ("train_grid empty grid", lambda w: baselines.train_grid(w[1].apply, [(w[3], w[2])], TARGETS, 1, []),
     "one learning rate"),
    ("train_grid epochs=0", lambda w: baselines.train_grid(w[1].apply, [(w[3], w[2])], TARGETS, 0, [0.1]),
     "epochs must be"),
    ("as_training_data tune_pairs=0", lambda w: baselines.as_training_data(
        w[1], w[0], [w[3]], np.array([0, 1, 2]), 1, [w[2]], tune_pairs=0), "tune_draws must be"),
    ("random_real with labels beyond the classes", lambda w: baselines.random_real_baseline(
        w[1], w[0], 1, 1, np.array([0, 12]), n_draws=1, tune_draws=1), "must lie in 0..9"),
    ("optimised_real without scoring networks", lambda w: baselines.baseline_sets(
        "optimised_real", w[1], w[0], 1, 1, np.array([0, 1]), [w[2], w[2]]), "own scoring networks"),
    # attack, reuse
    ("attack with K = T", lambda w: attack.check_classes(3, 3, 10), "must differ"),
    ("order_accuracy of an unknown order", lambda w: reuse.order_accuracy(
        "backwards", w[1], w[0], w[3], np.array([0, 1, 2]), np.ones((1, 2))), "--order must be one of"),
    ("order_accuracy with no networks", lambda w: reuse.order_accuracy(
        "learned", w[1], w[0], w[3], np.array([0, 1, 2]), np.ones((1, 2)), inits=[]), "inits is empty"),
]


@pytest.mark.parametrize("call, match", [(c, m) for _, c, m in WRONG_CALLS],
                         ids=[name for name, _, _ in WRONG_CALLS])
def test_a_wrong_call_is_one_clear_value_error(world, call, match):
    with pytest.raises(ValueError, match=match) as raised:
        call(world)
    message = str(raised.value)
    assert "\n" not in message and message.rstrip().endswith((".", ")"))


def test_right_calls_still_work(world):
    digits, mlp, theta0, x = world
    np.testing.assert_array_equal(losses.one_hot(np.array([0.0, 2.0]), 3),
                                  [[1, 0, 0], [0, 0, 1]])           # whole floats are whole classes
    z = labels.initial_logits(np.array([0, 1]), 10, 2, confidence=0.9)
    assert z.shape == (2, 2, 10)
    trained = unroll.unroll(mlp.apply, theta0, x, TARGETS, np.zeros((1, 2)))   # 0: a step left out
    np.testing.assert_array_equal(trained["w0"], theta0["w0"])
