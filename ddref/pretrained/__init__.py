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

A pool is one verified ``.npz`` file in ``data.cache_dir()/pretrained/``
(:mod:`ddref.pretrained.pool` describes it).

The package in layers, each module importing only those above it in this list:

    pool        PoolSpec, Pool, PoolError, the pool file: save_pool, load_pool, list_pools
    training    train_pool, the memory and disk checks, get_pool, the pools of a run
    evaluation  the pre-trained-mode metrics on the held-out (or fixed) networks
"""

from __future__ import annotations

from ddref.evaluate import Accuracy  # noqa: F401  (the cli prints pools' accuracies with it)
from ddref.pretrained.pool import (  # noqa: F401
    BATCH_SIZE, BETAS, HELD_OUT_SEED_OFFSET, POOL_DTYPE, PRETRAINED_MODES, SPLITS, Pool, PoolError,
    PoolSpec, checksum, list_pools, load_pool, pool_dir, save_pool, write_npz,
)
from ddref.pretrained.training import (  # noqa: F401
    RunPools, available_memory, check_pool_fits, get_pool, pool_bytes, pool_label, pools_for,
    specs_for, train_pool,
)
from ddref.pretrained.evaluation import (  # noqa: F401
    FINE_TUNE_EPOCHS, METRIC_NAMES, evaluate, evaluate_run, evaluate_saved, evaluation_networks,
    summary_lines,
)
