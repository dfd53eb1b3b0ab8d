"""Many networks at once (evaluate.train_many, accuracies_on) give what one network at a time
gives: the readable loop over train_on_steps / accuracy_on is the reference."""

import numpy as np
import pytest

from ddref import baselines, evaluate, losses, nn
from ddref.evaluate import TrainingDiverged, accuracies_on, accuracy_on, train_many, train_on_steps

STEPS, EPOCHS, PER_STEP = 3, 2, 10


def problem(name="mlp", shape=(1, 8, 8), k=4, seed=0):
    rng = np.random.default_rng(seed)
    model = nn.build_model(name, shape, 10)
    inits = [model.init(rng, dtype="float64") for _ in range(k)]
    sets = [rng.normal(size=(STEPS, PER_STEP, *shape)) for _ in range(k)]
    targets = losses.one_hot(np.arange(PER_STEP) % 10, 10, "float64")
    lrs = np.full((EPOCHS, STEPS), 0.05) + 0.01 * rng.random((EPOCHS, STEPS))
    x_test, y_test = rng.normal(size=(300, *shape)), rng.integers(0, 10, 300)
    return model, inits, sets, targets, lrs, x_test, y_test


def assert_same_networks(batched, looped, tol=1e-10):
    assert len(batched) == len(looped)
    for a, b in zip(batched, looped):
        assert a.keys() == b.keys()
        for name in a:
            assert np.abs(a[name] - b[name]).max() <= tol * max(1.0, np.abs(b[name]).max())


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_held_out_inits_with_shared_images_match_the_loop(momentum):
    model, inits, sets, targets, lrs, x_test, y_test = problem()
    batched = train_many(model.apply, inits, sets[0], targets, lrs, momentum)
    looped = [train_on_steps(model.apply, theta0, sets[0], targets, lrs, momentum) for theta0 in inits]
    assert_same_networks(batched, looped)
    assert accuracies_on(model.apply, batched, x_test, y_test) == \
        [accuracy_on(model.apply, p, x_test, y_test) for p in looped]


def test_per_step_soft_targets_match_the_loop():
    model, inits, sets, _, lrs, _, _ = problem()
    soft = np.random.default_rng(1).dirichlet(np.ones(10), size=(STEPS, PER_STEP))
    assert_same_networks(train_many(model.apply, inits, sets[0], soft, lrs),
                         [train_on_steps(model.apply, th, sets[0], soft, lrs) for th in inits])


def test_one_set_per_network_matches_the_loop():
    model, inits, sets, targets, lrs, x_test, y_test = problem()
    batched = train_many(model.apply, inits, sets, targets, lrs)
    looped = [train_on_steps(model.apply, th, x, targets, lrs) for th, x in zip(inits, sets)]
    assert_same_networks(batched, looped)
    assert_same_networks(train_many(model.apply, inits, np.stack(sets), targets, lrs), looped)
    assert accuracies_on(model.apply, batched, x_test, y_test) == \
        [accuracy_on(model.apply, p, x_test, y_test) for p in looped]


def test_chunks_give_the_same_networks(monkeypatch):
    model, inits, sets, targets, lrs, x_test, y_test = problem(k=5)
    whole = train_many(model.apply, inits, sets, targets, lrs)
    accs = accuracies_on(model.apply, whole, x_test, y_test)
    monkeypatch.setattr(evaluate, "EVAL_CHUNK", 2)
    assert_same_networks(train_many(model.apply, inits, sets, targets, lrs), whole, tol=0.0)
    assert accuracies_on(model.apply, whole, x_test, y_test) == accs


DIVERGING = 1e200      # θ − η g reaches ~1e200, the next logits overflow: NaN from then on


def test_a_diverging_lr_of_the_grid_leaves_the_others_alone():
    model, inits, sets, targets, _, x_test, y_test = problem(k=4)
    grid = (0.01, DIVERGING, 0.1, 0.3)
    schedules = [np.full((EPOCHS, STEPS), lr) for lr in grid]
    with np.errstate(all="raise"):     # a diverging network must not raise for the batch
        batched = train_many(model.apply, inits, sets, targets, schedules)
        accs = accuracies_on(model.apply, batched, x_test, y_test, diverged="nan")
    with np.errstate(all="ignore"):
        looped = [train_on_steps(model.apply, th, x, targets, s)
                  for th, x, s in zip(inits, sets, schedules)]
    assert not all(np.isfinite(w).all() for w in batched[1].values())
    assert np.isnan(accs[1])
    keep = [0, 2, 3]
    assert_same_networks([batched[i] for i in keep], [looped[i] for i in keep])
    assert [accs[i] for i in keep] == [accuracy_on(model.apply, looped[i], x_test, y_test) for i in keep]
    with pytest.raises(TrainingDiverged, match="learning rates are too large"):
        accuracies_on(model.apply, batched, x_test, y_test)


def test_tune_lr_scores_a_diverging_lr_minus_infinity_and_picks_as_the_loop_does():
    model, inits, sets, targets, _, x_test, y_test = problem(k=3)
    pairs = list(zip(sets, inits))
    grid = (DIVERGING, 0.003, 0.03, 0.3)

    def loop_score(lr):
        with np.errstate(all="ignore"):
            nets = [train_on_steps(model.apply, th, x, targets, np.full((EPOCHS, STEPS), lr))
                    for x, th in pairs]
            try:
                return np.mean([accuracy_on(model.apply, p, x_test, y_test) for p in nets])
            except TrainingDiverged:
                return -np.inf

    scores = [loop_score(lr) for lr in grid]
    assert scores[0] == -np.inf and len(set(scores[1:])) == 3      # the choice means something
    chosen = baselines.tune_lr(model.apply, pairs, targets, EPOCHS, x_test, y_test, grid)
    assert chosen == grid[int(np.argmax(scores))]
    nets = baselines.train_grid(model.apply, pairs, targets, EPOCHS, grid)
    for lr, group in zip(grid[1:], nets[1:]):
        assert_same_networks(group, [train_on_steps(model.apply, th, x, targets,
                                                    np.full((EPOCHS, STEPS), lr)) for x, th in pairs])


def test_conv_networks_take_the_loop():
    model, inits, sets, targets, lrs, x_test, y_test = problem("lenet", (1, 28, 28), k=2)
    batched = train_many(model.apply, inits, sets, targets, lrs)
    looped = [train_on_steps(model.apply, th, x, targets, lrs) for th, x in zip(inits, sets)]
    assert_same_networks(batched, looped, tol=0.0)
    assert accuracies_on(model.apply, batched, x_test[:50], y_test[:50]) == \
        [accuracy_on(model.apply, p, x_test[:50], y_test[:50]) for p in looped]


def test_evaluate_distilled_is_the_loop_over_held_out_inits():
    model, _, sets, _, lrs, x_test, y_test = problem(k=3)

    class Data:
        num_classes = 10
    data = Data()
    data.x_test, data.y_test = x_test, y_test
    labels = np.arange(PER_STEP) % 10
    result = evaluate.evaluate_distilled(model, data, sets[0], labels, lrs, n_inits=3, seed=5)
    inits = evaluate.held_out_inits(model, 3, 5, "float64")
    targets = losses.one_hot(labels, 10, "float64")
    assert list(result.values) == [accuracy_on(model.apply, train_on_steps(model.apply, th, sets[0],
                                                                           targets, lrs),
                                               x_test, y_test) for th in inits]


@pytest.mark.parametrize("bad, match", [
    (lambda sets, lrs: dict(x_steps=sets[:3]),
     "x_steps must be one array with 5 axes shared by all 4 networks, or 4 of them"),
    (lambda sets, lrs: dict(lrs=np.stack([lrs, lrs])), "lrs must be one array with 2 axes"),
    (lambda sets, lrs: dict(lrs=np.full_like(lrs, np.nan)), "the learning rates contain NaN"),
    (lambda sets, lrs: dict(lrs=np.full((EPOCHS, STEPS + 1), 0.1)),
     "do not fit 3 groups of distilled images"),
    (lambda sets, lrs: dict(x_steps=[sets[0], sets[1][:2], sets[2], sets[3]]),
     "need sets and learning rates of one shape"),
    (lambda sets, lrs: dict(momentum=1.5), "momentum must be in"),
])
def test_bad_input_is_one_sentence_before_training(bad, match):
    model, inits, sets, targets, lrs, _, _ = problem()
    args = dict(x_steps=sets, lrs=lrs, momentum=0.0)
    args.update(bad(sets, lrs))
    with pytest.raises(ValueError, match=match):
        train_many(model.apply, inits, args["x_steps"], targets, args["lrs"], args["momentum"])
