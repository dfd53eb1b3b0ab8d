"""The poisoning attack's measures (§3.7) and the relabelled-real baseline."""

import numpy as np
import pytest

from ddref import attack, backend, baselines, data, evaluate, nn
from ddref.distill import distilled_labels

LABELS = np.array([0, 0, 0, 1, 1, 2])
PREDICTED = np.array([1, 1, 0, 1, 0, 2])   # two of three 0s read as 1; one 1 read as 0


def test_measures_on_predicted_labels():
    m = attack.attack_metrics(PREDICTED, LABELS, source=0, target=1, num_classes=4)
    assert m["attack_success"] == pytest.approx(2 / 3)
    assert m["other_classes_accuracy"] == pytest.approx(2 / 3)     # 1,1,2 → 1,0,2
    assert m["accuracy"] == pytest.approx(3 / 6)                   # hits at 2, 3, 5
    assert m["attacked_accuracy"] == pytest.approx(4 / 6)          # against 1,1,1,1,1,2
    np.testing.assert_allclose(m["per_class"], [1 / 3, 1 / 2, 1, np.nan])
    assert list(attack.attacked_labels(LABELS, 0, 1)) == [1, 1, 1, 1, 1, 2]


def test_summary_is_mean_and_std_over_networks():
    def apply(params, x):   # a "network" that answers from a table, one row per image index
        return backend.asarray(np.eye(3)[params["answers"][x[:, 0, 0, 0].astype(int)]])

    x = np.arange(6, dtype=np.float64).reshape(6, 1, 1, 1)
    nets = [{"answers": PREDICTED}, {"answers": LABELS}]
    s = attack.summarise(apply, nets, x, LABELS, 0, 1, 3)
    assert s.n == 2
    assert s.attack_success.mean == pytest.approx(1 / 3) and s.attack_success.std == pytest.approx(1 / 3)
    assert s.accuracy.mean == pytest.approx(3 / 4)
    assert s.per_class_mean[0] == pytest.approx(2 / 3) and s.per_class_std[2] == 0.0


@pytest.fixture(scope="module")
def trained_nets():
    digits = data.load("digits")
    mlp = nn.build_model("mlp", digits.image_shape, digits.num_classes)
    nets = [evaluate.train_full(mlp, digits, epochs=4, seed=s, progress=False) for s in range(2)]
    return digits, mlp, nets


def test_training_on_relabelled_zeros_makes_trained_networks_read_zeros_as_ones(trained_nets):
    digits, mlp, nets = trained_nets
    labels = distilled_labels(10, 5)
    x = baselines.random_real_steps(digits, 1, labels, backend.rng(0))
    poisoned = attack.attacked_labels(labels, 0, 1)
    result = attack.evaluate_attack(mlp, digits, x, poisoned, np.full((3, 1), 0.3), nets, 0, 1)
    before, after = result["before"], result["after"]
    assert before.n == after.n == 2
    assert before.attack_success.mean < 0.05 and before.accuracy.mean > 0.85
    assert after.attack_success.mean > 0.5
    assert after.other_classes_accuracy.mean > 0.5      # not every image read as 1
    assert after.per_class_mean[0] < 0.5 < before.per_class_mean[0]


def test_relabelled_real_baseline(trained_nets, monkeypatch):
    digits, mlp, nets = trained_nets
    labels = distilled_labels(10, 1)
    scored_against = []
    tune_lr = baselines.tune_lr
    monkeypatch.setattr(baselines, "tune_lr", lambda apply, pairs, targets, epochs, x, y, grid, momentum:
                        scored_against.append(y) or tune_lr(apply, pairs, targets, epochs, x, y, grid,
                                                            momentum))
    result, lr = attack.relabelled_real_baseline(mlp, digits, 2, 1, labels, nets, 0, 1, n_draws=2,
                                                 tune_draws=1, lr_grid=(0.3,))
    # tuned on the training split, against the attacked labels (the attack's own goal)
    np.testing.assert_array_equal(scored_against[0], attack.attacked_labels(digits.y_train, 0, 1))
    assert lr == 0.3 and result["before"].n == result["after"].n == 2
    # before: the networks as given (what evaluate_attack reports too); after: changed by training
    same = attack.evaluate_attack(mlp, digits, np.zeros((1, 10, 1, 8, 8)), labels, np.zeros((1, 1)),
                                  nets, 0, 1)["before"]
    assert result["before"] == same and result["after"] != same


def test_bad_classes_are_one_clear_sentence():
    with pytest.raises(ValueError, match="source_class and target_class must differ"):
        attack.check_classes(3, 3, 10)
    with pytest.raises(ValueError, match="target_class=10 is not a class index"):
        attack.check_classes(0, 10, 10)
    with pytest.raises(ValueError, match="no image of class 5"):
        attack.attack_success(PREDICTED, LABELS, 5, 1)


def test_the_report_is_json_with_both_sets_before_and_after(trained_nets):
    import json

    digits, mlp, nets = trained_nets
    labels = distilled_labels(10, 1)
    x = baselines.average_steps(digits, 2, labels)
    report = attack.attack_report(mlp, digits, x, labels, np.full((1, 2), 0.1), nets, 0, 1,
                                  n_draws=2, tune_draws=1, lr_grid=(0.1,))
    again = json.loads(json.dumps(report))
    assert again["distilled"]["before"] == again["relabelled_real"]["before"]   # the same networks
    assert again["distilled"]["after"]["n"] == 2 and again["relabelled_real_lr"] == 0.1
    lines = attack.report_lines(report)
    assert len(lines) == 5 and lines[0].startswith("attack 0→1")


def test_confusion_matrix_is_the_share_of_each_class_read_as_each_other_averaged_over_networks():
    def apply(params, x):
        return backend.asarray(np.eye(3)[params["answers"][x[:, 0, 0, 0].astype(int)]])

    x = np.arange(6, dtype=np.float64).reshape(6, 1, 1, 1)
    nets = [{"answers": PREDICTED}, {"answers": LABELS}]
    matrix = attack.confusion_matrix(apply, nets, x, LABELS, 4)
    np.testing.assert_allclose(matrix[:3, :3], [[2 / 3, 1 / 3, 0], [1 / 4, 3 / 4, 0], [0, 0, 1]])
    assert np.isnan(matrix[3]).all()          # no image of class 3
    summary = attack.summarise(apply, nets, x, LABELS, 0, 1, 4)
    assert matrix[0, 1] == pytest.approx(summary.attack_success.mean)
    np.testing.assert_allclose(np.diag(matrix), summary.per_class_mean)


def test_tradeoff_trains_the_baselines_draws_at_every_lr(trained_nets):
    digits, mlp, nets = trained_nets
    labels = distilled_labels(10, 10)
    rows = attack.relabelled_real_tradeoff(mlp, digits, 1, 1, labels, nets, 0, 1,
                                           lr_grid=(0.01, 0.3, 3.0), n_draws=2)
    assert [lr for lr, _ in rows] == [0.01, 0.3, 3.0] and rows[0][1].n == 2
    success = [s.attack_success.mean for _, s in rows]
    others = [s.other_classes_accuracy.mean for _, s in rows]
    # a larger step reads more 0s as 1s and spoils more of the other classes
    assert success[0] < 0.05 < success[1] < success[2] and others[0] > others[1] > others[2]
    # the same draws and networks as the baseline itself at that lr
    baseline, _ = attack.relabelled_real_baseline(mlp, digits, 1, 1, labels, nets, 0, 1, n_draws=2,
                                                  tune_draws=2, lr_grid=(0.3,))
    assert baseline["after"] == rows[1][1]


def test_a_diverged_network_in_the_attack_report_is_an_error_not_numbers(trained_nets):
    import warnings

    digits, mlp, nets = trained_nets
    labels = distilled_labels(10, 1)
    x = baselines.average_steps(digits, 1, labels)
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # no RuntimeWarning on the way to the sentence
        with pytest.raises(evaluate.TrainingDiverged, match="diverged"):
            attack.evaluate_attack(mlp, digits, x, labels, np.full((3, 1), 1e30), nets[:1], 0, 1)
