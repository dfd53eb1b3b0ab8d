"""Pools of pre-trained networks: train, store, verify, sample, hold out (§3.6).

The paper distils for four kinds of θ0: fixed, random, **fixed pre-trained** (one trained
network, the same every iteration) and **random pre-trained** (every iteration draws
networks from a pool trained from different seeds).  A pool is ``n_nets`` networks of one
model, each trained by :func:`ddref.evaluate.train_full` (Adam, β = (0.9, 0.999), batches of
64) from its own seed on the full training split of a *source* data set, brought to the
target's image shape by :mod:`ddref.transforms` when the two differ.

Two pools per setting, with disjoint seeds:

* the **training** pool (seeds 0, 1, …) — the networks distillation sees;
* the **held-out** pool (seeds 1,000,000, 1,000,001, …) — the networks it is evaluated on.

A pool is one ``.npz`` file in ``data.cache_dir()/pretrained/`` holding every network's
parameters, its seed, its source train and test accuracy, the source's normalisation and
the image shape, the training settings and the ddref version.  The file is written
deterministically (fixed zip timestamps, sorted entries: the same command gives the same
bytes) and atomically, carries a SHA-256 of its contents, and is verified on every load;
``allow_pickle`` is never used.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

import ddref
from ddref import backend, data, nn, transforms
from ddref.baselines import random_real_baseline
from ddref.saved import check_folder_writable, write_atomically
from ddref.evaluate import (Accuracy, accuracies_on, accuracy_on, check_trained, evaluate_distilled,
                            train_full)

PRETRAINED_MODES = ("fixed-pretrained", "random-pretrained")
SPLITS = ("train", "held-out")
HELD_OUT_SEED_OFFSET = 1_000_000       # held-out seeds start here; training pools stay below it
BATCH_SIZE = 64
BETAS = (0.9, 0.999)
POOL_DTYPE = "float32"
FINE_TUNE_EPOCHS = 3                   # full_target_accuracy: Adam epochs on the whole target split
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)      # the earliest zip timestamp: no clock in the file


class PoolError(ValueError):
    """A pool that cannot be used (corrupt, mismatched, asked for wrongly); says the fix."""


# ---------------------------------------------------------------------------- what a pool is


@dataclass(frozen=True)
class PoolSpec:
    """Everything that determines a pool's contents (and so its file name)."""

    source: str                 # data set the networks are trained on
    target: str                 # data set whose image shape they take (== source: none changed)
    model: str
    image_shape: tuple          # (C, H, W) the networks take
    num_classes: int
    split: str                  # 'train' | 'held-out'
    n_nets: int
    epochs: int
    lr: float
    batch_size: int = BATCH_SIZE

    def __post_init__(self):
        if self.split not in SPLITS:
            raise PoolError(f"a pool split must be one of {SPLITS}, got {self.split!r}.")
        if not 1 <= self.n_nets < HELD_OUT_SEED_OFFSET:
            raise PoolError(f"a pool holds 1…{HELD_OUT_SEED_OFFSET - 1} networks, got "
                            f"{self.n_nets}; choose another --pool-nets / --nets.")
        if self.epochs < 1 or not self.lr > 0:
            raise PoolError(f"pre-training needs epochs ≥ 1 and lr > 0, got {self.epochs} and "
                            f"{self.lr}; fix --pretrain-epochs / --pretrain-lr.")

    def seeds(self):
        first = 0 if self.split == "train" else HELD_OUT_SEED_OFFSET
        return list(range(first, first + self.n_nets))

    def settings(self):
        d = dataclasses.asdict(self)
        d["image_shape"] = list(self.image_shape)
        d.update(optimiser="adam", betas=list(BETAS), dtype=POOL_DTYPE, init_scheme="xavier",
                 seeds=f"{self.seeds()[0]}…{self.seeds()[-1]}", transform_version=transforms.VERSION)
        return d

    def filename(self):
        digest = hashlib.sha256(json.dumps(self.settings(), sort_keys=True).encode()).hexdigest()
        c, h, w = self.image_shape
        source = self.source if self.source == self.target else f"{self.source}2{self.target}"
        return f"{source}-{self.model}-{c}x{h}x{w}-{self.split}-{self.n_nets}nets-{digest[:10]}.npz"

    def path(self, root=None):
        return pool_dir(root) / self.filename()


def pool_dir(root=None) -> Path:
    """Where pools live: ``data.cache_dir(root)/pretrained`` (``$DDREF_DATA`` honoured)."""
    return data.cache_dir(root) / "pretrained"


@dataclass
class Pool:
    """Pre-trained networks on the host, with what they were trained on and how well."""

    params: list                # one dict of float32 arrays per network
    seeds: np.ndarray
    train_accuracy: np.ndarray  # on the (transformed) source training split
    test_accuracy: np.ndarray   # on the (transformed) source test split
    mean: np.ndarray            # the source normalisation the networks saw
    std: np.ndarray
    meta: dict                  # spec settings, transform, version
    sha256: str = ""
    path: Path | None = None

    def __len__(self):
        return len(self.params)

    def network(self, i, dtype=POOL_DTYPE):
        """Network ``i`` on the selected backend, as ``dtype``."""
        if not 0 <= i < len(self):
            raise PoolError(f"the pool has networks 0…{len(self) - 1}, not {i}; choose another "
                            f"--pretrained-net.")
        return {k: backend.asarray(v, dtype=dtype) for k, v in self.params[i].items()}

    def networks(self, ids, dtype=POOL_DTYPE):
        return [self.network(i, dtype) for i in ids]

    def record(self):
        """What a run writes down about the pool it used."""
        return {"file": self.path.name if self.path else None, "sha256": self.sha256,
                "split": self.meta["spec"]["split"], "n_nets": len(self),
                "seeds": [int(s) for s in self.seeds],
                "source_test_accuracy": float(np.mean(self.test_accuracy)),
                "transform": self.meta["transform"], "settings": self.meta["spec"]}


# ---------------------------------------------------------------------------- training


def train_pool(spec: PoolSpec, dataset: data.Dataset | None = None, progress=True) -> Pool:
    """Train the networks of ``spec``, one per seed, on the source training split."""
    loaded = data.load(spec.source, dtype=POOL_DTYPE) if dataset is None else dataset
    dataset = transforms.to_shape(loaded, spec.target, spec.image_shape)
    model = nn.build_model(spec.model, spec.image_shape, spec.num_classes)
    params, train_acc, test_acc = [], [], []
    for seed in tqdm(spec.seeds(), desc=f"pretrain {spec.n_nets} {spec.model} on {spec.source}",
                     unit="net", disable=not progress, dynamic_ncols=True):
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # said just below
            p = train_full(model, dataset, epochs=spec.epochs, batch_size=spec.batch_size,
                           lr=spec.lr, seed=seed, dtype=POOL_DTYPE, progress=False)
        check_trained(model, p, dataset, f"the pre-training lr {spec.lr:g} (--lr / --pretrain-lr)")
        params.append({k: backend.to_numpy(v) for k, v in p.items()})
        train_acc.append(accuracy_on(model.apply, p, dataset.x_train, dataset.y_train))
        test_acc.append(accuracy_on(model.apply, p, dataset.x_test, dataset.y_test))
    meta = {"spec": spec.settings(), "version": ddref.__version__,
            "transform": transforms.describe(loaded.name, loaded.image_shape, spec.target,
                                             spec.image_shape),
            "normalisation": "per-channel mean and std of the transformed source training split"}
    return Pool(params=params, seeds=np.asarray(spec.seeds(), dtype=np.int64),
                train_accuracy=np.asarray(train_acc), test_accuracy=np.asarray(test_acc),
                mean=np.asarray(dataset.mean, dtype=np.float64),
                std=np.asarray(dataset.std, dtype=np.float64), meta=meta)


# ---------------------------------------------------------------------------- storage


def _arrays_of(pool: Pool) -> dict:
    arrays = {"seeds": pool.seeds, "train_accuracy": pool.train_accuracy,
              "test_accuracy": pool.test_accuracy, "mean": pool.mean, "std": pool.std,
              "meta": np.array(json.dumps(pool.meta, sort_keys=True))}
    for i, p in enumerate(pool.params):
        for k, v in p.items():
            arrays[f"net{i:06d}/{k}"] = np.asarray(v)
    return arrays


def checksum(arrays: dict) -> str:
    """SHA-256 over every entry's name, dtype, shape and bytes, in sorted order."""
    digest = hashlib.sha256()
    for key in sorted(arrays):
        a = np.ascontiguousarray(arrays[key])
        digest.update(f"{key}|{a.dtype.str}|{a.shape}|".encode())
        digest.update(a.tobytes())
    return digest.hexdigest()


def write_npz(path, arrays: dict):
    """An ``.npz`` that ``np.load`` reads, written so that the same arrays give the same bytes:
    sorted entries with a fixed timestamp (``np.savez`` stamps each entry with the current
    time), to a temporary file renamed into place (a crash or a full disk leaves no
    half-written pool and no temporary file; the failure is one sentence)."""
    def write(stream):
        with zipfile.ZipFile(stream, "w", zipfile.ZIP_STORED) as archive:
            for key in sorted(arrays):
                info = zipfile.ZipInfo(key + ".npy", date_time=_ZIP_TIME)
                info.external_attr = 0o644 << 16
                with archive.open(info, "w", force_zip64=True) as entry:
                    np.lib.format.write_array(entry, np.asarray(arrays[key]), allow_pickle=False)

    write_atomically(path, write)


def save_pool(pool: Pool, path) -> Pool:
    arrays = _arrays_of(pool)
    pool.sha256 = checksum(arrays)
    arrays["sha256"] = np.array(pool.sha256)
    write_npz(path, arrays)
    pool.path = Path(path)
    return pool


def _corrupt(path, why) -> PoolError:
    return PoolError(f"the pre-trained pool {path} {why}, so it is truncated or corrupt and was "
                     f"not used: delete it and run the command again to retrain it.")


def load_pool(path) -> Pool:
    """Read a pool and verify its checksum; a damaged file raises :class:`PoolError`."""
    path = Path(path)
    if not path.is_file():
        raise PoolError(f"no pre-trained pool at {path}; make one with `ddref pretrain`.")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as error:  # zip, CRC, header and pickle errors all mean a damaged file
        raise _corrupt(path, f"cannot be read ({error.__class__.__name__})") from None
    stored = str(arrays.pop("sha256", ""))
    if not stored or checksum(arrays) != stored:
        raise _corrupt(path, "does not match the checksum stored inside it")
    n = len(arrays["seeds"])
    params = [{} for _ in range(n)]
    for key, value in arrays.items():
        if key.startswith("net"):
            i, name = key[3:].split("/", 1)
            params[int(i)][name] = value
    return Pool(params=params, seeds=arrays["seeds"], train_accuracy=arrays["train_accuracy"],
                test_accuracy=arrays["test_accuracy"], mean=arrays["mean"], std=arrays["std"],
                meta=json.loads(str(arrays["meta"])), sha256=stored, path=path)


def get_pool(spec: PoolSpec, root=None, progress=True, log=print) -> tuple:
    """The pool of ``spec`` from the cache, verified; trained and saved first when absent.
    Returns (pool, trained_now)."""
    path = spec.path(root)
    if path.exists():
        pool = load_pool(path)
        if pool.meta["spec"] != spec.settings():
            raise PoolError(f"the pool {path} was trained with other settings than its name says; "
                            f"delete it and run the command again.")
        return pool, False
    source = data.load(spec.source, dtype=POOL_DTYPE)  # one clear error first if it cannot be had
    check_folder_writable(path.parent, "the pre-trained pool folder")   # before, not after, training
    check_pool_fits(spec, path.parent)
    log(f"no pre-trained {spec.split} pool of {spec.n_nets} {spec.model} networks on "
        f"{spec.source} at {path}: training it now ({spec.epochs} epochs of Adam, lr {spec.lr:g}, "
        f"batch {spec.batch_size}, seeds {spec.seeds()[0]}…{spec.seeds()[-1]}).")
    return save_pool(train_pool(spec, source, progress), path), True


def pool_bytes(spec: PoolSpec) -> int:
    """The bytes of the pool's parameters: n_nets × (parameters of one network) × 4 (float32).
    Training holds them all in memory until the file is written, and the file is as large."""
    model = nn.build_model(spec.model, spec.image_shape, spec.num_classes)
    per_net = sum(int(np.prod(shape)) for shape in model.init.shapes.values())
    return spec.n_nets * per_net * np.dtype(POOL_DTYPE).itemsize


def available_memory():
    """Bytes of memory available to a new allocation (Linux: MemAvailable), or None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def check_pool_fits(spec: PoolSpec, folder):
    """Refuse, before any network is trained, a pool larger than the memory available now or
    the free space of ``folder``, with the numbers."""
    need = pool_bytes(spec)
    room = {"of memory is available": available_memory()}
    try:
        room[f"is free on the disk of {folder}"] = shutil.disk_usage(folder).free
    except OSError:
        pass
    for where, have in room.items():
        if have is not None and need > have:
            raise PoolError(
                f"a pool of {spec.n_nets:,} {spec.model} networks holds {_gb(need)} of parameters "
                f"but only {_gb(have)} {where}; choose fewer --nets / --pool-nets "
                f"(at most about {max(1, spec.n_nets * have // need):,}).")


def _gb(n):
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def list_pools(root=None) -> list:
    """One row per pool file in the cache: its settings, accuracy, and whether it verifies."""
    rows = []
    for path in sorted(pool_dir(root).glob("*.npz")):
        try:
            pool = load_pool(path)
            spec = pool.meta["spec"]
            rows.append({"file": path.name, "ok": True, "source": spec["source"],
                         "target": spec["target"], "model": spec["model"], "split": spec["split"],
                         "n_nets": len(pool), "epochs": spec["epochs"],
                         "test_accuracy": Accuracy.of(pool.test_accuracy),
                         "version": pool.meta["version"]})
        except PoolError as error:
            rows.append({"file": path.name, "ok": False, "error": str(error)})
    return rows


# ---------------------------------------------------------------------------- the pools of a run


def specs_for(config, target: data.Dataset, held_out_nets=None) -> tuple:
    """The (training, held-out) pool specs a distillation config needs."""
    source = config.source_dataset or config.dataset
    common = dict(source=source, target=target.name, model=config.model,
                  image_shape=tuple(target.image_shape), num_classes=target.num_classes,
                  epochs=config.pretrain_epochs, lr=config.pretrain_lr)
    n_held = held_out_nets or config.eval_inits
    return PoolSpec(split="train", n_nets=config.pool_nets, **common), \
        PoolSpec(split="held-out", n_nets=n_held, **common)


@dataclass
class RunPools:
    train: Pool
    held_out: Pool
    trained_now: list           # the splits this call had to train

    def records(self):
        return {"train": self.train.record(), "held_out": self.held_out.record(),
                "trained_now": self.trained_now}


def pools_for(config, target: data.Dataset, progress=True, log=print, root=None,
              held_out_nets=None) -> RunPools:
    """Load (or train) the pools of ``config``; check them against the ones it recorded."""
    pools, trained = {}, []
    for spec in specs_for(config, target, held_out_nets):
        pools[spec.split], now = get_pool(spec, root, progress, log)
        if now:
            trained.append(spec.split)
    run = RunPools(pools["train"], pools["held-out"], trained)
    _check_recorded(config.train_pool, run.train)
    if held_out_nets is None:
        _check_recorded(config.eval_pool, run.held_out)
    return run


def pool_label(pool: Pool) -> str:
    """How a config records a pool: its file name and checksum."""
    return f"{pool.path.name} sha256:{pool.sha256}"


def _check_recorded(recorded: str, pool: Pool):
    if recorded and recorded != pool_label(pool):
        raise PoolError(f"this run was made with the pool {recorded!r} but the cache now holds "
                        f"{pool_label(pool)!r}; restore that pool file, or start a new run.")


# ---------------------------------------------------------------------------- evaluation


def evaluate(model, target: data.Dataset, x_steps, labels, lrs, nets, seed=0, baseline_draws=None,
             fine_tune_epochs=FINE_TUNE_EPOCHS, fine_tune_lr=1e-3, progress=False,
             momentum=0.0) -> dict:
    """The pre-trained-mode metrics on the target test split, mean ± std over ``nets``
    (the distilled and random-real steps trained with the run's inner momentum β):

    before_accuracy       the networks as they are;
    distilled_accuracy    after training on the distilled steps (x_steps, lrs);
    random_real_accuracy  after the same steps on as many random real target images, with one
                          learning rate tuned on the target training split;
    full_target_accuracy  after ``fine_tune_epochs`` of Adam on the whole target training split.
    """
    dtype = str(backend.to_numpy(x_steps).dtype)
    steps, epochs = x_steps.shape[0], lrs.shape[0]
    before = accuracies_on(model.apply, nets, target.x_test, target.y_test)
    distilled = evaluate_distilled(model, target, x_steps, labels, lrs, inits=nets,
                                   momentum=momentum)
    with np.errstate(over="ignore", invalid="ignore"):  # the lr grid's largest values diverge
        baseline, baseline_lr = random_real_baseline(
            model, target, steps, epochs, labels, inits=nets, n_draws=baseline_draws or len(nets),
            seed=seed, dtype=dtype, momentum=momentum)
    full = []
    for i, th in enumerate(tqdm(nets, desc="fine-tune on the target", disable=not progress)):
        tuned = train_full(model, target, epochs=fine_tune_epochs, lr=fine_tune_lr, seed=seed + i,
                           dtype=dtype, theta0=th, progress=False)
        full.append(accuracy_on(model.apply, tuned, target.x_test, target.y_test))
    return {"before_accuracy": dataclasses.asdict(Accuracy.of(before)),
            "distilled_accuracy": dataclasses.asdict(distilled),
            "random_real_accuracy": dataclasses.asdict(baseline),
            "random_real_lr": baseline_lr,
            "full_target_accuracy": dataclasses.asdict(Accuracy.of(full)),
            "full_target_fine_tune": {"epochs": fine_tune_epochs, "lr": fine_tune_lr,
                                      "optimiser": "adam", "batch_size": BATCH_SIZE}}


def evaluation_networks(config, pools: RunPools, n_nets=None) -> tuple:
    """(pool, ids): fixed-pretrained is evaluated on its own network, random-pretrained on
    the first ``n_nets`` (default ``eval_inits``) networks of the held-out pool."""
    if config.init == "fixed-pretrained":
        return pools.train, [config.pretrained_net]
    return pools.held_out, list(range(n_nets or config.eval_inits))


def evaluate_run(config, model, target, x_steps, labels, lrs, pools: RunPools, n_nets=None,
                 baseline_draws=None, progress=False) -> dict:
    """:func:`evaluate` on the networks ``config`` is evaluated on, with which ones recorded."""
    pool, ids = evaluation_networks(config, pools, n_nets)
    x = backend.asarray(x_steps, dtype=config.dtype)
    metrics = evaluate(model, target, x, labels, backend.asarray(lrs, dtype=config.dtype),
                       pool.networks(ids, config.dtype), seed=config.seed,
                       baseline_draws=baseline_draws, progress=progress, momentum=config.momentum)
    metrics["evaluated_on"] = {"pool": pool.meta["spec"]["split"], "file": pool.path.name,
                               "network_ids": ids}
    return metrics


def evaluate_saved(distilled, n_nets=None, baseline_draws=None, progress=True, root=None) -> dict:
    """Re-evaluate a saved pre-trained-mode distilled set on the pool(s) it records."""
    from ddref.config import DistillConfig

    config = DistillConfig.from_dict(distilled.config)
    target = data.load(config.dataset)
    model = nn.build_model(config.model, target.image_shape, target.num_classes)
    model.check_input(distilled.images.shape)
    pools = pools_for(config, target, progress=progress, root=root,
                      held_out_nets=n_nets if n_nets and n_nets > config.eval_inits else None)
    return evaluate_run(config, model, target, distilled.images, distilled.labels, distilled.lrs,
                        pools, n_nets=n_nets, baseline_draws=baseline_draws)


METRIC_NAMES = ("before_accuracy", "distilled_accuracy", "random_real_accuracy",
                "full_target_accuracy")


def summary_lines(metrics: dict) -> list:
    """The printed summary: one line per metric, as mean ± std over the networks."""
    labels = {"before_accuracy": "pre-trained, as they are",
              "distilled_accuracy": "after the distilled steps",
              "random_real_accuracy": "after as many random real images",
              "full_target_accuracy": "fine-tuned on the whole target"}
    lines = []
    for name in METRIC_NAMES:
        acc = Accuracy(**metrics[name])
        extra = f" (lr {metrics['random_real_lr']:g})" if name == "random_real_accuracy" else ""
        lines.append(f"  {name:22s} {labels[name]:34s} {acc}{extra}")
    return lines
