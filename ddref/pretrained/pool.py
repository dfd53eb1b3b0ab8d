"""What a pool is, and its file: :class:`PoolSpec`, :class:`Pool`, save, load, list.

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
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ddref import backend, data, transforms
from ddref.evaluate import Accuracy
from ddref.saved import write_atomically


PRETRAINED_MODES = ("fixed-pretrained", "random-pretrained")
SPLITS = ("train", "held-out")
HELD_OUT_SEED_OFFSET = 1_000_000       # held-out seeds start here; training pools stay below it
BATCH_SIZE = 64
BETAS = (0.9, 0.999)
POOL_DTYPE = "float32"
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
