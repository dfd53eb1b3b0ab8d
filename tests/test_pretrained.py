"""Pre-trained initialisations (§3.6): the adaptation transforms, pools on disk (deterministic,
verified, reused), disjoint training and held-out pools, the two pre-trained init modes, the
pre-trained evaluation, meta-gradients from a pre-trained θ0, and the paper's adaptation
pairs on small stand-in files."""

import json

import numpy as np
import pytest
from test_data import publish
from test_hypergrad import AGREE, TOL, make_problem, reference_meta_loss

from ddref import cli, data, engines, hypergrad, nn, pretrained, transforms
from ddref.distill import DistillConfig, DistilledSet, Distiller
from ddref.pretrained import PoolError, PoolSpec

# ---------------------------------------------------------------------------- transforms


def test_resample_matrix_is_the_identity_at_scale_one():
    np.testing.assert_allclose(transforms.resample_matrix(7, 7, 1.0), np.eye(7), atol=1e-12)


@pytest.mark.parametrize("n_in,n_out,scale", [(8, 28, 2.5), (16, 28, 1.25), (28, 16, 16 / 20),
                                              (32, 28, 20 / 32)])
def test_resample_rows_are_averages(n_in, n_out, scale):
    """Inside the source's frame every output pixel is a weighted average of source pixels
    (a constant image stays constant); beyond it the background 0 blends in."""
    m = transforms.resample_matrix(n_in, n_out, scale)
    assert m.shape == (n_out, n_in) and (m >= 0).all()
    sums = m.sum(axis=1)
    assert (sums <= 1 + 1e-12).all()
    centres = (np.arange(n_out) + 0.5 - (n_out - n_in * scale) / 2) / scale - 0.5
    inside = (centres >= max(1, 1 / scale) - 1) & (centres <= n_in - max(1, 1 / scale))
    assert inside.sum() >= n_out // 2
    np.testing.assert_allclose(sums[inside], 1.0, atol=1e-12)
    outside = (centres < -0.5 - max(1, 1 / scale)) | (centres > n_in - 0.5 + max(1, 1 / scale))
    assert (sums[outside] == 0).all()


def test_digits_land_centred_in_mnist_digit_box():
    """An 8×8 digit becomes a 28×28 image whose ink sits in the central 20×20 box (plus the
    one-pixel spread of the filter), centred where the source's ink was."""
    x = np.zeros((1, 1, 8, 8))
    x[0, 0, 1:7, 2:6] = 1.0
    out = transforms.transform_pixels(x, "digits", "mnist5k", (1, 28, 28))
    assert out.shape == (1, 1, 28, 28)
    rows, cols = np.nonzero(out[0, 0] > 1e-9)
    assert rows.min() >= 4 and rows.max() <= 23 and cols.min() >= 4 and cols.max() <= 23
    edge = np.zeros((1, 1, 8, 8))
    edge[0, 0, 7, :] = 1.0                      # ink on the border is not smeared outwards
    smeared = transforms.transform_pixels(edge, "digits", "mnist5k", (1, 28, 28))
    assert smeared[0, 0, 25:].max() == 0 and smeared[0, 0, :, :3].max() == 0
    ys, xs = np.indices((28, 28))
    mass = out[0, 0] / out[0, 0].sum()
    assert abs((mass * ys).sum() - 13.5) < 1e-9 and abs((mass * xs).sum() - 13.5) < 1e-9


def test_channels_grey_to_rgb_and_back():
    rng = np.random.default_rng(0)
    grey = rng.random((3, 1, 16, 16))
    rgb = transforms.transform_pixels(grey, "usps", "usps", (3, 16, 16))
    for c in range(3):
        np.testing.assert_allclose(rgb[:, c], grey[:, 0], atol=1e-12)
    colour = rng.random((2, 3, 32, 32))
    luma = transforms.transform_pixels(colour, "svhn", "svhn", (1, 32, 32))
    want = 0.299 * colour[:, 0] + 0.587 * colour[:, 1] + 0.114 * colour[:, 2]
    np.testing.assert_allclose(luma[:, 0], want, atol=1e-12)
    with pytest.raises(ValueError, match="grey \\(1\\) and RGB \\(3\\)"):
        transforms.channel_matrix(2, 3)


def test_to_shape_standardises_with_its_own_statistics():
    digits = data.load("digits", dtype="float64")
    big = transforms.to_shape(digits, "mnist5k", (1, 28, 28))
    assert big.x_train.shape == (1437, 1, 28, 28) and big.x_test.shape == (360, 1, 28, 28)
    assert abs(big.x_train.mean()) < 1e-9 and abs(big.x_train.std() - 1) < 1e-9
    np.testing.assert_array_equal(big.y_train, digits.y_train)
    pixels = data.denormalise(big.x_train, big.mean, big.std)
    assert pixels.min() > -1e-9 and pixels.max() < 1 + 1e-9   # an average of pixels in [0, 1]
    assert transforms.to_shape(digits, "digits", (1, 8, 8)) is digits


# ---------------------------------------------------------------------------- pools on disk


def small_spec(split="train", n_nets=2, **overrides):
    values = dict(source="digits", target="digits", model="mlp", image_shape=(1, 8, 8),
                  num_classes=10, split=split, n_nets=n_nets, epochs=1, lr=1e-3)
    values.update(overrides)
    return PoolSpec(**values)


def test_same_command_same_bytes(tmp_path):
    a, _ = pretrained.get_pool(small_spec(), root=tmp_path / "a", progress=False)
    b, _ = pretrained.get_pool(small_spec(), root=tmp_path / "b", progress=False)
    assert a.path.read_bytes() == b.path.read_bytes()
    assert a.path.name == b.path.name and a.path.parent.name == "pretrained"


def test_pool_holds_what_it_promises(tmp_path):
    pool, trained = pretrained.get_pool(small_spec(), root=tmp_path, progress=False)
    assert trained and len(pool) == 2
    again = pretrained.load_pool(pool.path)
    assert again.sha256 == pool.sha256 and len(again.sha256) == 64
    assert again.seeds.tolist() == [0, 1]
    assert (again.test_accuracy > 0.5).all() and (again.train_accuracy > 0.5).all()
    assert again.meta["spec"]["epochs"] == 1 and again.meta["version"]
    assert again.mean.shape == again.std.shape == (1,)
    assert "digits as loaded" in again.meta["transform"]
    for k, v in pool.params[1].items():
        np.testing.assert_array_equal(again.params[1][k], v)
    # networks from different seeds differ
    assert not np.array_equal(again.params[0]["w0"], again.params[1]["w0"])


def test_existing_pool_is_reused_not_retrained(tmp_path, monkeypatch):
    first, _ = pretrained.get_pool(small_spec(), root=tmp_path, progress=False)
    monkeypatch.setattr(pretrained.training, "train_pool", lambda *a, **k: pytest.fail("retrained"))
    second, trained = pretrained.get_pool(small_spec(), root=tmp_path, progress=False)
    assert not trained and second.sha256 == first.sha256


@pytest.mark.parametrize("damage", ["truncate", "flip_a_byte", "rewrite_one_network"])
def test_damaged_pool_is_refused_with_one_sentence(tmp_path, damage):
    pool, _ = pretrained.get_pool(small_spec(), root=tmp_path, progress=False)
    raw = pool.path.read_bytes()
    if damage == "truncate":
        pool.path.write_bytes(raw[: len(raw) // 2])
    elif damage == "flip_a_byte":
        middle = len(raw) // 2
        pool.path.write_bytes(raw[:middle] + bytes([raw[middle] ^ 0xFF]) + raw[middle + 1:])
    else:  # a well-formed file whose contents no longer match its stored checksum
        with np.load(pool.path) as f:
            arrays = {k: f[k] for k in f.files}
        arrays["net000000/w0"] = arrays["net000000/w0"] + 1
        pretrained.write_npz(pool.path, arrays)
    with pytest.raises(PoolError, match="truncated or corrupt and was not used: delete it") as raised:
        pretrained.get_pool(small_spec(), root=tmp_path, progress=False)
    assert str(pool.path) in str(raised.value) and "\n" not in str(raised.value)
    rows = pretrained.list_pools(tmp_path)
    assert [r["ok"] for r in rows] == [False]


def test_training_and_held_out_pools_are_disjoint(tmp_path):
    config = DistillConfig(init="random-pretrained", pool_nets=3, eval_inits=2, pretrain_epochs=1)
    digits = data.load("digits")
    train, held_out = pretrained.specs_for(config, digits)
    assert (train.split, held_out.split) == ("train", "held-out")
    assert set(train.seeds()).isdisjoint(held_out.seeds())
    assert train.filename() != held_out.filename()
    pools = pretrained.pools_for(config, digits, progress=False, root=tmp_path)
    assert set(pools.train.seeds.tolist()).isdisjoint(pools.held_out.seeds.tolist())
    trained = {tuple(np.ravel(p["w0"][:2, :2])) for p in pools.train.params}
    held = {tuple(np.ravel(p["w0"][:2, :2])) for p in pools.held_out.params}
    assert trained.isdisjoint(held)
    # the largest training pool allowed still stays below the held-out seeds
    biggest = small_spec(n_nets=pretrained.HELD_OUT_SEED_OFFSET - 1)
    assert max(biggest.seeds()) < min(held_out.seeds())
    with pytest.raises(PoolError, match="--pool-nets"):
        small_spec(n_nets=pretrained.HELD_OUT_SEED_OFFSET)


# ---------------------------------------------------------------------------- init modes


def tiny_config(init, **overrides):
    values = dict(init=init, steps=2, epochs=1, batch_size=64, iterations=3, dtype="float64",
                  eval_every=0, eval_inits=2, checkpoint_every=0, seed=1, pool_nets=3,
                  pretrain_epochs=1, n_nets=2 if init.startswith("random") else 1)
    values.update(overrides)
    return DistillConfig(**values)


def test_fixed_pretrained_uses_one_pool_network_every_iteration(cache):
    distiller = Distiller(tiny_config("fixed-pretrained", pretrained_net=1), progress=False)
    pool = distiller.pools.train
    want = pool.network(1, "float64")
    for _ in range(3):
        got = distiller.sample_theta0()
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    assert distiller.config.train_pool.startswith(pool.path.name)
    distiller.run()
    saved = distiller.distilled_set()
    assert saved.config["train_pool"] == pretrained.pool_label(pool)
    np.testing.assert_array_equal(saved.theta0["w0"], pool.params[1]["w0"].astype("float64"))


def test_random_pretrained_draws_only_training_networks(cache):
    distiller = Distiller(tiny_config("random-pretrained"), progress=False)
    train = [p["w0"].astype("float64") for p in distiller.pools.train.params]
    held = [p["w0"].astype("float64") for p in distiller.pools.held_out.params]
    seen = set()
    for _ in range(30):
        w0 = distiller.sample_theta0()["w0"]
        matches = [i for i, w in enumerate(train) if np.array_equal(w, w0)]
        assert len(matches) == 1 and not any(np.array_equal(w, w0) for w in held)
        seen.add(matches[0])
    assert seen == {0, 1, 2}


def test_recorded_pool_must_match(cache):
    config = tiny_config("random-pretrained")
    Distiller(config, progress=False)
    config.train_pool = "someone-elses-pool.npz sha256:0"
    with pytest.raises(PoolError, match="restore that pool file, or start a new run"):
        Distiller(config, progress=False)


def test_source_dataset_needs_a_pretrained_mode():
    with pytest.raises(ValueError, match="--source-dataset needs --init fixed-pretrained or random-pretrained"):
        DistillConfig(init="random", source_dataset="digits").validate()
    with pytest.raises(ValueError, match="--pretrained-net must name a network of the pool, 0 … 19"):
        DistillConfig(init="fixed-pretrained", pretrained_net=20).validate()


def test_pretrained_evaluation_has_the_four_numbers(cache):
    distiller = Distiller(tiny_config("random-pretrained", iterations=2), progress=False).run()
    saved = distiller.distilled_set()
    metrics = pretrained.evaluate_run(distiller.config, distiller.model, distiller.dataset,
                                      saved.images, saved.labels, saved.lrs, distiller.pools)
    for name in pretrained.METRIC_NAMES:
        assert metrics[name]["n"] == 2 and 0 <= metrics[name]["mean"] <= 1
    assert metrics["evaluated_on"] == {"pool": "held-out", "file": distiller.pools.held_out.path.name,
                                       "network_ids": [0, 1]}
    # distilled accuracy is what the run itself reports, on the same held-out networks
    assert metrics["distilled_accuracy"]["mean"] == distiller.accuracy().mean
    # the pre-trained digits MLPs already classify digits well; fine-tuning keeps them there
    assert metrics["before_accuracy"]["mean"] > 0.5 and metrics["full_target_accuracy"]["mean"] > 0.5
    again = pretrained.evaluate_saved(saved, progress=False)
    for name in pretrained.METRIC_NAMES:
        assert again[name] == metrics[name]


# ---------------------------------------------------------------------------- meta-gradients


@pytest.fixture(scope="module")
def pretrained_mlp64():
    pool = pretrained.train_pool(small_spec(n_nets=1, epochs=2), progress=False)
    return {k: v.astype("float64") for k, v in pool.params[0].items()}


def test_meta_gradient_from_a_pretrained_theta0(pretrained_mlp64, rel_err, central_fd):
    """A pre-trained θ0 is just another θ0: both engines agree with each other and with
    central finite differences of the meta-loss, as in test_hypergrad, starting from a
    trained network instead of a fresh draw."""
    p = make_problem("mlp", seed=2)
    p["theta0"] = pretrained_mlp64
    mg = {e: engines.meta_gradient(e, **p) for e in ("naive", "backgrad")}
    assert rel_err(mg["naive"].loss, reference_meta_loss(p, p["x_distilled"], p["raw_lrs"])) < 1e-12
    assert rel_err(mg["naive"].grad_x, mg["backgrad"].grad_x) < AGREE
    assert rel_err(mg["naive"].grad_raw_lrs, mg["backgrad"].grad_raw_lrs) < AGREE
    x, raw = p["x_distilled"], p["raw_lrs"]
    g = mg["naive"].grad_x
    rng = np.random.default_rng(3)
    for _attempt in range(5):
        r = rng.normal(size=x.shape)
        d = g / np.linalg.norm(g) + r / np.linalg.norm(r)
        fd = central_fd(lambda t: reference_meta_loss(p, x + t * d, raw), eps=1e-4, halvings=6)
        if fd is not None:
            break
    assert fd is not None
    for engine in ("naive", "backgrad"):
        assert rel_err(fd, np.vdot(mg[engine].grad_x, d)) < TOL
    for i in np.ndindex(raw.shape):
        unit = np.zeros_like(raw)
        unit[i] = 1.0
        fd = central_fd(lambda t: reference_meta_loss(p, x, raw + t * unit), eps=1e-4, halvings=6)
        assert fd is not None
        for engine in ("naive", "backgrad"):
            assert rel_err(fd, mg[engine].grad_raw_lrs[i]) < TOL


# ---------------------------------------------------------------------------- the paper's pairs


@pytest.mark.parametrize("source,target,model", [("usps", "mnist", "lenet"),
                                                 ("svhn", "mnist", "lenet"),
                                                 ("mnist", "usps", "mlp")])
def test_adaptation_pairs_on_stand_in_files(source, target, model, tmp_path, monkeypatch):
    """USPS→MNIST, SVHN→MNIST (LeNet takes 28×28) and MNIST→USPS (16×16: the MLP), end to
    end on tiny files in the published formats: the pools are trained on the source in the
    target's shape, and distillation plus the pre-trained evaluation run on the target."""
    root = tmp_path / "cache"
    for i, name in enumerate((source, target)):
        (tmp_path / name).mkdir()
        published = publish(name, tmp_path / name, monkeypatch, seed=i)
        published.root = root
        published.place_in_cache()
    monkeypatch.setenv("DDREF_DATA", str(root))
    config = tiny_config("random-pretrained", dataset=target, source_dataset=source, model=model,
                         steps=1, dtype="float32", iterations=2, pool_nets=2, batch_size=8)
    distiller = Distiller(config, progress=False).run()
    pools = distiller.pools
    shape = data.load(target).image_shape
    assert pools.train.meta["spec"]["source"] == source
    assert pools.train.meta["spec"]["image_shape"] == list(shape)
    assert f"{source} " in pools.train.meta["transform"] and "→" in pools.train.meta["transform"]
    nn.build_model(model, shape, 10).check_input((1, *shape))
    saved = distiller.distilled_set()
    metrics = pretrained.evaluate_run(distiller.config, distiller.model, distiller.dataset,
                                      saved.images, saved.labels, saved.lrs, pools)
    assert all(0 <= metrics[k]["mean"] <= 1 for k in pretrained.METRIC_NAMES)


# ---------------------------------------------------------------------------- the command line


def test_cli_pretrain_list_distill_evaluate(cache, tmp_path, capsys):
    args = ["pretrain", "--dataset", "digits", "--model", "mlp", "--nets", "2", "--epochs", "1",
            "--no-progress"]
    assert cli.main(args) == 0
    assert "trained" in capsys.readouterr().out
    assert cli.main(args) == 0
    assert "reusing" in capsys.readouterr().out
    assert cli.main(["pretrain", "--list"]) == 0
    assert "digits-mlp-1x8x8-train-2nets" in capsys.readouterr().out

    out = tmp_path / "run"
    assert cli.main(["distill", "--init", "fixed-pretrained", "--iterations", "2", "--steps", "2",
                     "--epochs", "1", "--pretrain-epochs", "1", "--eval-inits", "2", "--pool-nets", "2",
                     "--eval-every", "0", "--baseline-draws", "2", "--no-progress",
                     "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "no pre-trained train pool" not in printed      # the pool `ddref pretrain` made is reused
    assert "before_accuracy" in printed and "full_target_accuracy" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["evaluated_on"]["network_ids"] == [0]
    assert set(pretrained.METRIC_NAMES) <= set(metrics)
    pools = json.loads((out / "pools.json").read_text())
    assert pools["train"]["settings"]["epochs"] == 1 and pools["held_out"]["seeds"][0] == 1_000_000
    saved = DistilledSet.load(out / "distilled.npz")
    assert saved.config["train_pool"] and saved.config["eval_pool"]
    assert cli.main(["evaluate", str(out)]) == 0
    assert "reproduced" in capsys.readouterr().out


def test_cli_corrupt_pool_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DDREF_DATA", str(tmp_path))
    pool, _ = pretrained.get_pool(small_spec(), progress=False)
    pool.path.write_bytes(pool.path.read_bytes()[:100])
    code = cli.main(["pretrain", "--dataset", "digits", "--model", "mlp", "--nets", "2",
                     "--epochs", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "truncated or corrupt" in err


@pytest.mark.parametrize("init", ["fixed-pretrained", "random-pretrained"])
def test_resume_is_exact_in_pretrained_modes(cache, tmp_path, init):
    config = tiny_config(init, iterations=4)
    whole = Distiller(config, progress=False).run()
    checkpoint = tmp_path / "checkpoint.npz"
    Distiller(tiny_config(init, iterations=4), progress=False).run(iterations=2, checkpoint_path=checkpoint)
    resumed = Distiller.from_checkpoint(checkpoint, progress=False).run()
    np.testing.assert_array_equal(resumed.x, whole.x)
    np.testing.assert_array_equal(resumed.raw_lrs, whole.raw_lrs)
    assert resumed.history.losses == whole.history.losses


def test_both_engines_distil_the_same_from_pretrained_networks(cache):
    """The whole random-pretrained run, naive against backgrad: same draws, same numbers."""
    runs = [Distiller(tiny_config("random-pretrained", engine=e), progress=False).run()
            for e in ("naive", "backgrad")]
    np.testing.assert_allclose(runs[0].history.losses, runs[1].history.losses, rtol=1e-10)
    np.testing.assert_allclose(runs[0].x, runs[1].x, rtol=0, atol=1e-8)


def test_missing_source_data_is_one_sentence_before_any_training(tmp_path, monkeypatch):
    monkeypatch.setenv("DDREF_DATA", str(tmp_path))
    config = tiny_config("random-pretrained", source_dataset="usps")
    monkeypatch.setattr(pretrained.training, "train_pool", lambda *a, **k: pytest.fail("trained anyway"))
    with pytest.raises(data.DataError, match="run `ddref download usps`"):
        Distiller(config, progress=False)
    assert not (tmp_path / "pretrained").exists()


# ---------------------------------------------------------------------------- sizes refused up front


def test_a_pool_too_large_for_memory_is_refused_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DDREF_DATA", str(tmp_path))
    monkeypatch.setattr(pretrained.training, "train_pool", lambda *a, **k: pytest.fail("trained anyway"))
    monkeypatch.setattr(pretrained.training, "available_memory", lambda: 20 * 10 ** 9)
    # the case: 999,999 digits MLPs of 9,610 parameters, float32 ≈ 38.4 GB
    assert pretrained.pool_bytes(small_spec(n_nets=999_999)) == 999_999 * 9_610 * 4
    assert cli.main(["pretrain", "--nets", "999999", "--epochs", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "999,999 mlp networks holds 38.4 GB" in err
    assert "only 20.0 GB of memory is available" in err and "at most about 520,291" in err
    monkeypatch.setattr(pretrained.training, "available_memory", lambda: 10 ** 12)
    monkeypatch.setattr(pretrained.training.shutil, "disk_usage", lambda folder: type("U", (), {"free": 10 ** 6}))
    assert cli.main(["pretrain", "--nets", "100", "--epochs", "1", "--no-progress"]) == 2
    assert "only 1.0 MB is free on the disk of" in capsys.readouterr().err
