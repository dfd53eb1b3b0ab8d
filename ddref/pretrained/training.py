"""Training the pools a run needs, or taking them from the cache.

:func:`get_pool` loads a pool of a :class:`~ddref.pretrained.pool.PoolSpec`, verified, or
trains it (:func:`train_pool`: each network by :func:`ddref.evaluate.train_full` from its
own seed on the source training split) and saves it — refusing first, with the numbers, a
pool larger than the memory or disk space available (:func:`check_pool_fits`).
:func:`pools_for` gives a distillation config its training and held-out pools and checks
them against the ones it recorded.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

import ddref
from ddref import backend, data, nn, sizes, transforms
from ddref.evaluate import accuracy_on, check_trained, train_full
from ddref.pretrained.pool import POOL_DTYPE, Pool, PoolError, PoolSpec, load_pool, save_pool
from ddref.saved import check_folder_writable


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
    """Bytes of memory available to a new allocation (:func:`ddref.sizes.available_bytes`)."""
    return sizes.available_bytes()


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
