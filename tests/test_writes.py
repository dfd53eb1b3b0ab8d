"""Every file ddref writes fails cleanly (issue 22, item 5): a full disk or a folder that
cannot take a file is one sentence naming the path, no ``.tmp`` stays behind, and a pool
folder that cannot be written is found before any network is trained."""

import errno
import json
import os

import matplotlib.pyplot as plt
import numpy as np
import pytest

from ddref import cli, pretrained, saved, table
from ddref.plot import save_figure
from ddref.saved import SavedFileError


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _figure_to(path):
    fig = plt.figure()
    try:
        save_figure(fig, path)
    finally:
        plt.close(fig)


WRITERS = {
    "atomic_savez": lambda p: saved.atomic_savez(p, {"a": np.zeros(3)}),
    "atomic_write_text": lambda p: saved.atomic_write_text(p, "{}"),
    "pool npz": lambda p: pretrained.write_npz(p, {"a": np.zeros(3)}),
    "table json": lambda p: table.write_json_atomic(p, {"a": 1}),
    "figure": _figure_to,
}


@pytest.mark.parametrize("name", WRITERS)
def test_a_full_disk_is_one_sentence_and_leaves_no_tmp(name, tmp_path, monkeypatch):
    monkeypatch.setattr(os, "fsync", _disk_full)
    path = tmp_path / "out" / "file.png"
    with pytest.raises(SavedFileError, match=f"could not write {path} .*free some disk space"):
        WRITERS[name](path)
    assert list(path.parent.iterdir()) == []


@pytest.mark.parametrize("name", WRITERS)
def test_a_folder_that_is_a_file_is_one_sentence(name, tmp_path):
    (tmp_path / "blocked").write_text("not a folder")
    path = tmp_path / "blocked" / "file.png"
    with pytest.raises(SavedFileError, match=f"could not write {path} "):
        WRITERS[name](path)


def test_distill_on_a_full_disk_is_one_line_and_leaves_no_tmp(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(os, "fsync", _disk_full)
    out = tmp_path / "run"
    code = cli.main(["distill", "--steps", "1", "--epochs", "1", "--iterations", "2",
                     "--checkpoint-every", "1", "--eval-every", "0", "--no-progress",
                     "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "checkpoint.npz" in err and "disk space" in err
    assert not list(tmp_path.rglob("*.tmp"))


def test_show_into_a_folder_that_cannot_take_files_is_one_line(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert cli.main(["distill", "--steps", "1", "--epochs", "1", "--iterations", "1",
                     "--eval-every", "0", "--baseline-draws", "1", "--no-progress",
                     "--out", str(out)]) == 0
    for png in out.glob("*.png"):      # read-only pictures are replaced, not written into
        png.chmod(0o444)
    capsys.readouterr()
    assert cli.main(["show", str(out)]) == 0
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(
        OSError(errno.EACCES, os.strerror(errno.EACCES))))
    assert cli.main(["show", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"could not write {out}/distilled.png" in err
    assert not list(out.glob("*.tmp"))


def test_an_unwritable_pool_folder_is_found_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DDREF_DATA", str(tmp_path))
    (tmp_path / "pretrained").write_text("a file where the pool folder should be")
    monkeypatch.setattr(pretrained.training, "train_pool", lambda *a, **k: pytest.fail("trained anyway"))
    assert cli.main(["pretrain", "--nets", "2", "--epochs", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pre-trained pool folder" in err and "before anything is trained" in err


def test_a_pool_folder_that_refuses_files_is_found_before_training(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setenv("DDREF_DATA", str(tmp_path))
    monkeypatch.setattr(tempfile, "mkstemp", lambda **k: (_ for _ in ()).throw(
        OSError(errno.EACCES, os.strerror(errno.EACCES))))
    monkeypatch.setattr(pretrained.training, "train_pool", lambda *a, **k: pytest.fail("trained anyway"))
    spec = pretrained.PoolSpec(source="digits", target="digits", model="mlp", image_shape=(1, 8, 8),
                               num_classes=10, split="train", n_nets=1, epochs=1, lr=1e-3)
    with pytest.raises(SavedFileError, match="cannot be written"):
        pretrained.get_pool(spec, progress=False, log=lambda *a: None)
