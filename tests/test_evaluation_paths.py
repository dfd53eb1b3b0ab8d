"""Every evaluation after a run trains exactly as the run did (issue 22, items 2 and 3):
the same networks (a pre-trained run's own pool), the same inner momentum β, whether the
number comes from the end of the run, the attack report, or `ddref evaluate --order`."""

import json
import re

import numpy as np
import pytest

from ddref import attack, baselines, cli, evaluate, nn, pretrained
from ddref.data import load
from ddref.distill import distilled_labels


def _percent(text, prefix):
    """The first 'NN.NN' percentage on the line of ``text`` that starts with ``prefix``."""
    line = next(line for line in text.splitlines() if line.strip().startswith(prefix))
    return float(re.search(r"(\d+\.\d+)(?: ± \d+\.\d+)?%", line.split(":", 1)[1]).group(1))


TINY = ["--steps", "2", "--epochs", "1", "--iterations", "3", "--eval-every", "0",
        "--checkpoint-every", "0", "--baseline-draws", "2", "--no-progress"]


def test_attack_report_and_evaluate_train_with_the_runs_momentum(tmp_path, capsys):
    out = tmp_path / "attack"
    assert cli.main(["distill", "--objective", "attack", "--source-class", "3", "--target-class",
                     "8", "--momentum", "0.9", *TINY, "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    distilled = metrics["distilled_accuracy"]["mean"]
    reported = metrics["attack"]["distilled"]["after"]["accuracy"]["mean"]
    assert reported == pytest.approx(distilled, abs=1e-12)      # same θ0, same steps, same β
    capsys.readouterr()
    assert cli.main(["evaluate", str(out), "--order", "learned"]) == 0
    learned = _percent(capsys.readouterr().out, "test accuracy, learned order")
    assert learned == pytest.approx(100 * distilled, abs=0.006)


@pytest.mark.parametrize("make", ["attack", "relabelled", "random_real", "pretrained"])
def test_every_baseline_and_report_passes_momentum_on(make, monkeypatch):
    """The momentum the caller gives reaches the inner training of each path."""
    digits = load("digits")
    mlp = nn.build_model("mlp", digits.image_shape, digits.num_classes)
    labels = distilled_labels(10, 1)
    nets = evaluate.held_out_inits(mlp, 2, 0, "float32")
    x = baselines.average_steps(digits, 2, labels)
    seen = []
    original = evaluate.train_many

    def spy(apply, theta0s, x_steps, targets, lrs, momentum=0.0):
        seen.append(momentum)
        return original(apply, theta0s, x_steps, targets, lrs, momentum)

    for module in (evaluate, baselines, attack):
        monkeypatch.setattr(module, "train_many", spy, raising=False)
    lrs = np.full((1, 2), 0.1, dtype=np.float32)
    if make == "attack":
        attack.evaluate_attack(mlp, digits, x, labels, lrs, nets, 0, 1, momentum=0.9)
    elif make == "relabelled":
        attack.relabelled_real_baseline(mlp, digits, 2, 1, labels, nets, 0, 1, n_draws=2,
                                        tune_draws=1, lr_grid=(0.1,), momentum=0.9)
    elif make == "random_real":
        baselines.random_real_baseline(mlp, digits, 2, 1, labels, inits=nets, n_draws=2,
                                       tune_draws=1, lr_grid=(0.1,), momentum=0.9)
    else:
        monkeypatch.setattr(pretrained.evaluation, "train_full", lambda model, *a, theta0=None, **k: theta0)
        pretrained.evaluate(mlp, digits, x, labels, lrs, nets, baseline_draws=2,
                            fine_tune_epochs=1, momentum=0.9)
    assert seen and all(m == 0.9 for m in seen)


def test_evaluate_order_on_a_pretrained_run_trains_the_runs_own_networks(cache, tmp_path, capsys):
    out = tmp_path / "pre"
    assert cli.main(["distill", "--init", "random-pretrained", "--pool-nets", "3",
                     "--pretrain-epochs", "1", "--eval-inits", "2", "--momentum", "0.5", *TINY,
                     "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    capsys.readouterr()
    assert cli.main(["evaluate", str(out), "--order", "learned"]) == 0
    printed = capsys.readouterr().out
    assert "held-out pool, networks [0, 1]" in printed
    learned = _percent(printed, "test accuracy, learned order")
    assert learned == pytest.approx(100 * metrics["distilled_accuracy"]["mean"], abs=0.006)
    # fresh random networks would sit near chance; the pre-trained ones do not
    assert learned > 50
    for order in ("shuffled", "pool"):
        assert cli.main(["evaluate", str(out), "--order", order]) == 0
        assert "held-out pool" in capsys.readouterr().out
    # another architecture has no pre-trained networks: one sentence, not fresh random ones
    assert cli.main(["evaluate", str(out), "--model", "lenet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no pre-trained lenet networks" in err
