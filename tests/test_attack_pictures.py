"""An attack run a student can read: distilled.png a grid no wider than 4:1 (one step of 100
images wraps onto rows), curves.png with the attack success on it, `ddref evaluate` measuring
the attack again, and a warning when the attacked networks were never trained."""

import json

import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ddref import cli, plot  # noqa: E402
from ddref.loop import History  # noqa: E402

ATTACK = ["--objective", "attack", "--source-class", "0", "--target-class", "1"]
TINY = ["--iterations", "4", "--eval-every", "2", "--steps", "1", "--epochs", "1",
        "--images-per-class", "10", "--eval-inits", "2", "--baseline-draws", "2", "--no-progress"]


def png_size(path):
    """(width, height) of a PNG, from its IHDR chunk."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


@pytest.fixture(scope="module")
def attack_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "attack"
    assert cli.main(["distill", *TINY, *ATTACK, "--init", "random", "--out", str(out)]) == 0
    return out


def test_one_step_of_100_images_is_a_grid_no_wider_than_4_to_1(attack_run):
    width, height = png_size(attack_run / "distilled.png")
    assert width <= 4 * height, f"distilled.png is {width} × {height}"
    assert height <= 4 * width, f"distilled.png is {width} × {height}"


@pytest.mark.parametrize("steps,per_step", [(1, 100), (1, 10), (1, 7), (2, 100), (10, 10), (3, 1)])
def test_the_wrapped_grid_keeps_every_image_in_its_step_and_the_aspect(steps, per_step):
    width = plot.wrap_width(steps, per_step)
    images = np.arange(steps * per_step, dtype=float).reshape(steps, per_step, 1, 1, 1)
    labels = [f"class {k % 10}" for k in range(per_step)]
    grid, cells, rows = plot.wrapped(images, labels, width)
    assert grid.shape[1] <= plot.MAX_ASPECT * grid.shape[0] or width == per_step == 1
    for s in range(steps):                       # step s's images, in order, on its own rows
        mine = [r for r, (step, _) in enumerate(rows) if step == s]
        values = [grid[r, c, 0, 0, 0] for r in mine for c in range(width) if cells[r][c] is not None]
        assert values == list(images[s, :, 0, 0, 0])
        assert [cells[r][c] for r in mine for c in range(width) if cells[r][c] is not None] == labels
        assert rows[mine[0]][1] and not any(rows[r][1] for r in mine[1:])


def test_the_curves_of_an_attack_run_show_the_attack_success(attack_run):
    metrics = json.loads((attack_run / "metrics.json").read_text())
    fig = plot.plot_curves(History(**metrics["history"]), attack=metrics["attack"])
    accuracy_axes = fig.axes[1]
    labels = [text.get_text() for text in accuracy_axes.get_legend().get_texts()]
    assert any(label.startswith("attack success 0→1") for label in labels), labels
    assert any("relabelled real" in label for label in labels), labels
    success = 100 * metrics["attack"]["distilled"]["after"]["attack_success"]["mean"]
    drawn = [line for line in accuracy_axes.get_lines() if line.get_marker() == "*"]
    assert drawn and np.isclose(drawn[0].get_ydata()[0], success)
    plt.close(fig)
    plain = plot.plot_curves(History(**metrics["history"]))
    assert not any("attack" in text.get_text() for text in plain.axes[1].get_legend().get_texts())
    plt.close(plain)


def test_evaluate_measures_the_attack_again(attack_run, capsys):
    assert cli.main(["evaluate", str(attack_run)]) == 0
    printed = capsys.readouterr().out
    assert "attack measures reported at the end of the run" in printed and "(reproduced)" in printed


def test_evaluate_says_when_the_attack_is_not_reproduced(attack_run, tmp_path, capsys):
    run = tmp_path / "copy"
    run.mkdir()
    (run / "distilled.npz").write_bytes((attack_run / "distilled.npz").read_bytes())
    metrics = json.loads((attack_run / "metrics.json").read_text())
    metrics["attack"]["distilled"]["after"]["attack_success"]["mean"] += 0.25
    (run / "metrics.json").write_text(json.dumps(metrics))
    assert cli.main(["evaluate", str(run)]) == 1
    assert "DIFFERENT" in capsys.readouterr().out


@pytest.mark.parametrize("init,warned", [("fixed", True), ("random", True),
                                         ("random-pretrained", False)])
def test_an_attack_on_untrained_networks_is_said(init, warned, capsys, monkeypatch):
    monkeypatch.setattr(cli.run, "_distill_in_locked_folder", lambda *a: 0)   # the warning only
    assert cli.main(["distill", *ATTACK, "--init", init, "--out", "unused"]) == 0
    err = capsys.readouterr().err
    assert ("attacks untrained networks" in err) == warned
