"""The README's reload call: a saved set, loaded in a fresh Python session, gives back the
accuracy its run reported —

    held_out_accuracy(DistilledSet.load("RUN/distilled.npz")) == metrics.json's distilled_accuracy

for every init mode (fixed, random, fixed-pretrained, random-pretrained), for the attack
objective and for learned labels.  Runs are tiny (digits, MLP, a few iterations)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ddref import cli
from ddref.distill import held_out_accuracy
from ddref.evaluate import Accuracy
from ddref.saved import DistilledSet

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--iterations", "3", "--steps", "2", "--epochs", "1", "--eval-every", "0",
        "--eval-inits", "2", "--baseline-draws", "2", "--batch-size", "64", "--no-progress"]
POOLS = ["--pool-nets", "3", "--pretrain-epochs", "1"]
RUNS = {
    "fixed": ["--init", "fixed"],
    "random": ["--init", "random"],
    "fixed-pretrained": ["--init", "fixed-pretrained", *POOLS],
    "random-pretrained": ["--init", "random-pretrained", *POOLS],
    "attack-random": ["--init", "random", "--objective", "attack", "--source-class", "0",
                      "--target-class", "1"],
    "attack-random-pretrained": ["--init", "random-pretrained", *POOLS, "--objective", "attack",
                                 "--source-class", "0", "--target-class", "1"],
    "learned-labels": ["--init", "fixed", "--learn-labels", "--label-form", "free"],
}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One $DDREF_DATA for the module: the pre-trained pools are trained once."""
    return tmp_path_factory.mktemp("ddref-data")


def make_run(name, cache, tmp_path, monkeypatch):
    monkeypatch.setenv("DDREF_DATA", str(cache))
    out = tmp_path / name
    assert cli.main(["distill", *TINY, *RUNS[name], "--out", str(out)]) == 0
    reported = json.loads((out / "metrics.json").read_text())["distilled_accuracy"]
    return out / "distilled.npz", reported


@pytest.mark.parametrize("name", sorted(RUNS))
def test_the_reload_call_reproduces_the_reported_accuracy(name, cache, tmp_path, monkeypatch):
    path, reported = make_run(name, cache, tmp_path, monkeypatch)
    again = held_out_accuracy(DistilledSet.load(path))
    assert again.mean == reported["mean"] and again.n == reported["n"], (
        f"{name}: reloaded {again}, the run reported {Accuracy(**reported)}")


def readme_snippet():
    """The Python block under the README's "Reload a saved set in Python" heading."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Reload a saved set in Python"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.parametrize("name", ["random-pretrained"])
def test_the_readme_snippet_in_a_fresh_interpreter(name, cache, tmp_path, monkeypatch):
    """The README's lines, run as they are by a new Python process, print the reported accuracy."""
    path, reported = make_run(name, cache, tmp_path, monkeypatch)
    code = readme_snippet().replace("runs/digits-mlp-fixed/distilled.npz", str(path))
    assert str(path) in code, "the README's snippet no longer loads runs/digits-mlp-fixed/distilled.npz"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DDREF_DATA": str(cache), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(Accuracy(**reported))
