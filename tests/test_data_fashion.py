"""Tests for Fashion-MNIST: where its files are found, how they are verified before they are
parsed, and (where Debian's dataset-fashion-mnist is installed) the real data.

The loader tests write small IDX files, gzip them, and pin their hashes in place of the real
ones, as a distribution's recompressed package would be pinned: MD5 of the official .gz
files, SHA-256 and size of the decompressed content.
"""

import gzip
import hashlib
import pathlib
import tracemalloc
import urllib.request
from dataclasses import replace

import numpy as np
import pytest

from ddref import cli, data
from ddref.data import cache, formats, verify
from ddref.data import DataError

NAME = "fashion-mnist"
FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
         "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
DEBIAN = pathlib.Path("/usr/share/datasets/fashion-mnist")


def idx(array, type_code=0x08):
    """IDX content: 0, 0, type code (0x08 unsigned bytes), ndim, big-endian dimensions, data."""
    header = bytes([0, 0, type_code, array.ndim])
    header += b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def one_sentence(message):
    return message.endswith(".") and message.count(". ") == 0 and "\n" not in message


class Small:
    """Small Fashion-MNIST files in a stand-in for the package folder, and an empty cache."""

    def __init__(self, tmp_path, monkeypatch, seed=0):
        rng = np.random.default_rng(seed)
        self.arrays = {}
        for prefix, n in (("train", 20), ("t10k", 10)):
            self.arrays[f"{prefix}-images-idx3-ubyte.gz"] = rng.integers(
                0, 256, size=(n, 28, 28), dtype=np.uint8)
            self.arrays[f"{prefix}-labels-idx1-ubyte.gz"] = rng.permutation(np.arange(n) % 10)
        self.plain = {f: idx(a) for f, a in self.arrays.items()}
        self.package = tmp_path / "usr-share-datasets" / NAME
        self.package.mkdir(parents=True)
        for filename, content in self.plain.items():
            (self.package / filename).write_bytes(gzip.compress(content, mtime=0))
        self.root = tmp_path / "cache"
        self.cache = self.root / NAME
        # Pin the content, as for Debian's recompressed files: no .gz here has the "official" MD5.
        monkeypatch.setitem(data.REMOTE_FILES, NAME, tuple(
            replace(r, md5="0" * 32, size=len(self.plain[r.filename]),
                    sha256=hashlib.sha256(self.plain[r.filename]).hexdigest())
            for r in data.REMOTE_FILES[NAME]))
        monkeypatch.setitem(cache.SYSTEM_FOLDERS, NAME, (
            cache.SystemFolder(self.package, "dataset-fashion-mnist"),))

    def fill_cache(self, level=1):
        """The same content gzipped otherwise: other bytes, same SHA-256."""
        self.cache.mkdir(parents=True, exist_ok=True)
        for filename, content in self.plain.items():
            (self.cache / filename).write_bytes(gzip.compress(content, compresslevel=level))


@pytest.fixture
def small(tmp_path, monkeypatch):
    return Small(tmp_path, monkeypatch)


@pytest.fixture
def no_parsing(monkeypatch):
    """Any attempt to parse an IDX file fails the test: refusals must come before it."""
    def parse(file):
        raise AssertionError(f"{file.path} was parsed")

    monkeypatch.setattr(formats, "_read_idx", parse)


def no_network(monkeypatch):
    def urlopen(url, timeout=None):
        raise AssertionError(f"tried to fetch {url}")

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)


# ---------------------------------------------------------------------------------------
# Where the files are found
# ---------------------------------------------------------------------------------------


def test_loads_from_the_package_folder_by_the_content_checksum(small):
    dataset = data.load(NAME, small.root, dtype="float64")
    assert dataset.classes == ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
    assert dataset.x_train.shape == (20, 1, 28, 28) and dataset.x_test.shape == (10, 1, 28, 28)
    np.testing.assert_array_equal(dataset.y_train, small.arrays["train-labels-idx1-ubyte.gz"])
    np.testing.assert_array_equal(dataset.y_test, small.arrays["t10k-labels-idx1-ubyte.gz"])
    pixels = data.denormalise(dataset.x_test, dataset.mean, dataset.std)
    np.testing.assert_allclose(pixels[:, 0] * 255, small.arrays["t10k-images-idx3-ubyte.gz"],
                               atol=1e-9)
    assert data.location(NAME, small.root) == (
        f"package folder {small.package} (dataset-fashion-mnist)")
    assert not small.cache.exists()  # nothing was copied


def test_normalisation_uses_the_training_split_only(small):
    dataset = data.load(NAME, small.root, dtype="float64")
    train_pixels = small.arrays["train-images-idx3-ubyte.gz"] / 255
    np.testing.assert_allclose(dataset.mean, [train_pixels.mean()])
    np.testing.assert_allclose(dataset.std, [train_pixels.std()])
    test_pixels = small.arrays["t10k-images-idx3-ubyte.gz"] / 255
    np.testing.assert_allclose(dataset.x_test[:, 0], (test_pixels - train_pixels.mean())
                               / train_pixels.std(), atol=1e-9)


def test_the_official_gz_is_accepted_by_its_md5(small, monkeypatch):
    """A file with the published MD5 needs no SHA-256: here every pinned SHA-256 is wrong."""
    official = {f: (small.package / f).read_bytes() for f in FILES}
    monkeypatch.setitem(data.REMOTE_FILES, NAME, tuple(
        replace(r, md5=hashlib.md5(official[r.filename]).hexdigest(), sha256="f" * 64)
        for r in data.REMOTE_FILES[NAME]))
    assert data.load(NAME, small.root).x_train.shape == (20, 1, 28, 28)


def test_the_cache_is_searched_before_the_package_folder(small, no_parsing):
    small.fill_cache()
    (small.package / FILES[0]).write_bytes(b"broken")  # never read: the cache wins
    assert data.location(NAME, small.root) == f"cache {small.cache}"
    with pytest.raises(AssertionError, match=f"{small.cache}/{FILES[0]} was parsed"):
        data.load(NAME, small.root)


def test_an_incomplete_cache_gives_way_to_a_complete_package_folder(small, monkeypatch):
    small.fill_cache()
    (small.cache / FILES[3]).unlink()
    assert data.location(NAME, small.root).startswith("package folder")
    no_network(monkeypatch)
    paths = data.download(NAME, small.root)  # the package's files: nothing to fetch
    assert paths == [small.package / f for f in FILES]
    assert not (small.cache / FILES[3]).exists()


def test_without_files_anywhere_the_message_names_both_ways(small):
    for filename in FILES[1:]:
        (small.package / filename).unlink()
    assert data.location(NAME, small.root) is None and not data.available(NAME, small.root)
    with pytest.raises(DataError) as raised:
        data.load(NAME, small.root)
    message = str(raised.value)
    assert one_sentence(message) and str(small.cache) in message
    assert "ddref download fashion-mnist" in message
    assert "apt-get install dataset-fashion-mnist" in message


def test_the_command_line_says_where_fashion_mnist_was_found(small, monkeypatch, capsys):
    monkeypatch.setenv("DDREF_DATA", str(small.root))
    assert cli.main(["datasets"]) == 0
    line = next(row for row in capsys.readouterr().out.splitlines() if row.startswith(NAME))
    assert f"yes, in the package folder {small.package}" in line
    (small.package / FILES[0]).unlink()
    assert cli.main(["datasets"]) == 0
    line = next(row for row in capsys.readouterr().out.splitlines() if row.startswith(NAME))
    assert "no: " in line and "apt-get install dataset-fashion-mnist" in line


# ---------------------------------------------------------------------------------------
# Verified before parsing: truncated, foreign and tampered files never reach the reader
# ---------------------------------------------------------------------------------------


def truncated(small, filename):
    content = (small.package / filename).read_bytes()
    return content[: len(content) // 2]


def wrong_magic(small, filename):
    """The same numbers announced as another IDX type (0x0D: 32-bit floats)."""
    return gzip.compress(idx(small.arrays[filename], type_code=0x0D))


def wrong_shape(small, filename):
    """An IDX file of 32×32 images: a well-formed file, but not this data set's."""
    n = len(small.arrays[filename])
    return gzip.compress(idx(np.zeros((n, 32, 32), dtype=np.uint8)))


def tampered(small, filename):
    """One pixel changed and the file recompressed: a valid gzip of the right size."""
    array = small.arrays[filename].copy()
    array.flat[len(array.flat) // 2] ^= 0xFF
    return gzip.compress(idx(array))


def bomb(small, filename):
    """A few kilobytes that decompress to far more than the file's IDX size."""
    return gzip.compress(bytes(10**7))


BAD = [truncated, wrong_magic, wrong_shape, tampered, bomb]


@pytest.mark.parametrize("make", BAD, ids=[f.__name__ for f in BAD])
@pytest.mark.parametrize("filename", [FILES[0], FILES[3]])
def test_a_bad_file_in_the_package_folder_is_refused_before_parsing(small, no_parsing, make,
                                                                    filename):
    (small.package / filename).write_bytes(make(small, filename))
    assert not data.available(NAME, small.root)
    with pytest.raises(DataError) as raised:
        data.load(NAME, small.root)
    message = str(raised.value)
    assert one_sentence(message) and str(small.package / filename) in message
    assert "apt-get install --reinstall dataset-fashion-mnist" in message
    assert "ddref download fashion-mnist" in message


@pytest.mark.parametrize("make", BAD, ids=[f.__name__ for f in BAD])
def test_a_bad_file_in_the_cache_is_refused_before_parsing(small, no_parsing, make):
    small.fill_cache()
    victim = small.cache / FILES[2]
    victim.write_bytes(make(small, FILES[2]))
    with pytest.raises(DataError, match="delete it and download it again") as raised:
        data.load(NAME, small.root)
    assert one_sentence(str(raised.value)) and str(victim) in str(raised.value)


def test_a_foreign_file_with_the_right_hash_is_still_refused_by_the_reader(small, monkeypatch):
    """Should a wrong-shaped file ever pass the checksum, the reader names it (no traceback)."""
    foreign = idx(np.zeros((20, 32, 32), dtype=np.uint8))
    (small.package / FILES[0]).write_bytes(gzip.compress(foreign))
    monkeypatch.setitem(data.REMOTE_FILES, NAME, tuple(
        replace(r, size=len(foreign), sha256=hashlib.sha256(foreign).hexdigest())
        if r.filename == FILES[0] else r for r in data.REMOTE_FILES[NAME]))
    with pytest.raises(DataError, match="do not hold matching images and labels") as raised:
        data.load(NAME, small.root)
    assert one_sentence(str(raised.value))


# ---------------------------------------------------------------------------------------
# Decompression with a limit
# ---------------------------------------------------------------------------------------


def test_decompression_stops_at_the_limit():
    """A 100 MB bomb is refused after at most limit + 1 bytes of output (well under 1 MB)."""
    compressed = gzip.compress(bytes(10**8))
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="more than 1,000 bytes"):
            verify._gunzip(compressed, 1000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 10**6


def test_decompression_reads_every_member_and_refuses_a_cut_stream():
    content = gzip.compress(b"first ") + gzip.compress(b"second")
    assert verify._gunzip(content, 12) == b"first second"
    with pytest.raises(ValueError, match="more than 11 bytes"):
        verify._gunzip(content, 11)
    with pytest.raises(ValueError, match="ends early"):
        verify._gunzip(content[:-3], 100)
    with pytest.raises(ValueError, match="not a valid gzip stream"):
        verify._gunzip(b"not gzip at all", 100)


# ---------------------------------------------------------------------------------------
# The real data, where Debian's package is installed
# ---------------------------------------------------------------------------------------

DEBIAN_FILES_PRESENT = all((DEBIAN / f).is_file() for f in FILES)


@pytest.mark.skipif(not DEBIAN_FILES_PRESENT,
                    reason=f"needs Debian's dataset-fashion-mnist in {DEBIAN} "
                           f"(apt-get install dataset-fashion-mnist)")
def test_the_real_fashion_mnist_from_the_debian_package(tmp_path):
    assert data.location(NAME, tmp_path) == f"package folder {DEBIAN} (dataset-fashion-mnist)"
    dataset = data.load(NAME, tmp_path)  # an empty cache: the package folder is used
    assert dataset.x_train.shape == (60000, 1, 28, 28) and dataset.x_test.shape == (10000, 1, 28, 28)
    assert dataset.x_train.dtype == np.float32
    np.testing.assert_array_equal(np.bincount(dataset.y_train, minlength=10), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(dataset.y_test, minlength=10), [1000] * 10)
    for x in (dataset.x_train, dataset.x_test):
        pixels = data.denormalise(x, dataset.mean, dataset.std)
        assert pixels.min() == pytest.approx(0, abs=1e-5)
        assert pixels.max() == pytest.approx(1, abs=1e-5)
    # The statistics the field quotes for Fashion-MNIST's training split.
    np.testing.assert_allclose([dataset.mean[0], dataset.std[0]], [0.2860, 0.3530], atol=1e-4)
