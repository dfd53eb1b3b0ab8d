"""Which files each download-backed data set needs, and their checksums: every load reads
a file once, checks those bytes, and hands the very same bytes to the reader."""

from __future__ import annotations

import hashlib
import pathlib
import zlib
from dataclasses import dataclass

from ddref.data.cache import SYSTEM_FOLDERS, SystemFolder, _kind, _locate
from ddref.data.dataset import DataError

# ---------------------------------------------------------------------------------------
# The published files
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RemoteFile:
    """One published file: its name on disk, its MD5 checksum, and where to fetch it.

    A gzipped file may also pin ``size``, the length of its decompressed content, and
    ``sha256``, the SHA-256 of that content.  With ``size`` the reader receives the
    decompressed bytes, and decompression stops at ``size`` bytes, so a gzip bomb cannot
    fill the memory; with ``sha256`` a recompressed copy (a distribution's package) is
    accepted when its content is exactly the published one.
    """

    filename: str
    md5: str  # of the file as published
    urls: tuple  # tried in order; later ones are mirrors
    size: int | None = None  # decompressed length of a gzipped file
    sha256: str | None = None  # of the decompressed content


_MNIST_MIRRORS = (
    # yann.lecun.com is the original home but now often refuses downloads (HTTP 403),
    # so the mirror torchvision uses is tried first.
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
_USPS_URL = "https://www.csie.ntu.edu.tw/~cjlin/libsvmtools/datasets/multiclass/"
_SVHN_URL = "http://ufldl.stanford.edu/housenumbers/"
_CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/"


_FASHION_MNIST_MIRRORS = (
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",  # the authors' own
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
)


def _mnist_file(filename: str, md5: str, size: int) -> RemoteFile:
    return RemoteFile(filename, md5, tuple(mirror + filename for mirror in _MNIST_MIRRORS), size)


def _fashion_mnist_file(filename: str, md5: str, size: int, sha256: str) -> RemoteFile:
    urls = tuple(mirror + filename for mirror in _FASHION_MNIST_MIRRORS)
    return RemoteFile(filename, md5, urls, size, sha256)


# MD5 checksums as published with torchvision's loaders (torchvision/datasets/*.py).
# Fashion-MNIST's SHA-256s are of the decompressed IDX files, computed from Debian's package
# dataset-fashion-mnist, whose .gz files are recompressed (other MD5s, same content); the
# sizes, MNIST's too, are those of the IDX format: 16 + 60,000 × 28 × 28 bytes, 8 + 60,000, ….
REMOTE_FILES = {
    "mnist": (
        _mnist_file("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873", 47_040_016),
        _mnist_file("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432", 60_008),
        _mnist_file("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3", 7_840_016),
        _mnist_file("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c", 10_008),
    ),
    "fashion-mnist": (
        _fashion_mnist_file(
            "train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d", 47_040_016,
            "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        ),
        _fashion_mnist_file(
            "train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe", 60_008,
            "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        ),
        _fashion_mnist_file(
            "t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79", 7_840_016,
            "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        ),
        _fashion_mnist_file(
            "t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310", 10_008,
            "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        ),
    ),
    "usps": (
        RemoteFile("usps.bz2", "ec16c51db3855ca6c91edd34d0e9b197", (_USPS_URL + "usps.bz2",)),
        RemoteFile("usps.t.bz2", "8ea070ee2aca1ac39742fdd1ef5ed118", (_USPS_URL + "usps.t.bz2",)),
    ),
    "svhn": (
        RemoteFile(
            "train_32x32.mat", "e26dedcc434d2e4c54c9b2d4a06d8373", (_SVHN_URL + "train_32x32.mat",)
        ),
        RemoteFile(
            "test_32x32.mat", "eb5a983be6a315427106f1b164d9cef3", (_SVHN_URL + "test_32x32.mat",)
        ),
    ),
    "cifar10": (
        RemoteFile(
            "cifar-10-python.tar.gz",
            "c58f30108f718f92721af3b95e74349a",
            (_CIFAR10_URL + "cifar-10-python.tar.gz",),
        ),
    ),
}


# ---------------------------------------------------------------------------------------
# Checksums: every load hashes the very bytes it then parses
# ---------------------------------------------------------------------------------------
#
# No marker file vouches for a file: anyone who can plant a file in the cache can plant a
# marker beside it, and CIFAR-10 is a pickle, so skipping the checksum would let a planted
# archive run code.  Hashing costs about as much as reading the file (0.9 s to read and
# hash 170 MB on a busy 2-core machine), less than decompressing and parsing it.  The file
# is read once; the checksum is taken of those bytes and the readers parse those same
# bytes, so nothing can swap the file in between.


@dataclass(frozen=True)
class _Verified:
    """The bytes of one published file, read once and checked before any reader sees them:
    the file's own bytes, or, for a file that pins its ``size``, its decompressed content."""

    path: pathlib.Path  # where they were read from, for messages
    content: bytes


def _md5_of(path: pathlib.Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _gunzip(content: bytes, limit: int) -> bytes:
    """The decompressed content of gzip ``content`` (one member or several), at most ``limit``
    bytes long: decompression stops at ``limit + 1`` bytes, so a bomb costs no more memory.

    Raises ``ValueError`` for a stream that is truncated, corrupt or longer than ``limit``.
    """
    pieces, total = [], 0
    try:
        while True:
            member = zlib.decompressobj(16 + zlib.MAX_WBITS)  # gzip header, CRC-32 and length
            piece = member.decompress(content, limit - total + 1)
            total += len(piece)
            if total > limit:
                raise ValueError(f"it decompresses to more than {limit:,} bytes")
            if not member.eof:
                raise ValueError("the gzip stream ends early")
            pieces.append(piece)
            content = member.unused_data
            if not content:
                return b"".join(pieces)
    except zlib.error as error:
        raise ValueError(f"not a valid gzip stream: {error}") from None


def _matches(remote: RemoteFile, content: bytes) -> bool:
    """Whether a file that is not the published one holds its content recompressed."""
    if remote.sha256 is None or remote.size is None:
        return False
    try:
        plain = _gunzip(content, remote.size)
    except ValueError:
        return False
    return len(plain) == remote.size and hashlib.sha256(plain).hexdigest() == remote.sha256


def _is_verified(remote: RemoteFile, path: pathlib.Path) -> bool:
    """Whether ``path`` is a readable file that passes ``remote``'s checks (never raises)."""
    try:
        if not path.is_file():
            return False
        if _md5_of(path) == remote.md5:
            return True
        return remote.sha256 is not None and _matches(remote, path.read_bytes())
    except OSError:
        return False


def _corrupt_file_error(name: str, path: pathlib.Path, package: SystemFolder | None) -> DataError:
    checksum = "its published checksum"
    if package is not None:
        return DataError(
            f"{path} matches neither {checksum} nor the pinned SHA-256 of its content (it is "
            f"truncated, corrupt or another file): reinstall it with `apt-get install "
            f"--reinstall {package.package}`, or run `ddref download {name}` to fetch a "
            f"verified copy into the cache, which is searched first."
        )
    return DataError(
        f"{path} does not match {checksum} (it is truncated or corrupt): "
        f"delete it and download it again with `ddref download {name}` "
        f"(or ddref.data.download({name!r}))."
    )


def _read_verified(name: str, remote: RemoteFile, path: pathlib.Path,
                   package: SystemFolder | None = None) -> _Verified:
    """Read ``path`` once and check it: its MD5 is the published one, or (where ``remote`` pins
    one) its decompressed content has the pinned SHA-256; anything else is refused unparsed."""
    try:
        content = path.read_bytes()
    except OSError as error:
        raise DataError(
            f"cannot read {path} ({error.strerror or error}): make it readable, or delete it "
            f"and download it again with `ddref download {name}`."
        ) from None
    if hashlib.md5(content).hexdigest() != remote.md5 and not _matches(remote, content):
        raise _corrupt_file_error(name, path, package)
    if remote.size is None:
        return _Verified(path, content)
    try:
        return _Verified(path, _gunzip(content, remote.size))
    except ValueError as error:  # only garbage that has the published MD5 gets here
        raise DataError(f"{path} is not a gzip file ({error}): delete it and download it "
                        f"again.") from None


def _verified_files(name: str, root=None) -> dict:
    """The files of ``name`` by file name, each read and checked against its checksum, from
    the first folder that holds them all: the cache, then a package's folder."""
    remote_files = REMOTE_FILES[name]
    directory, package = _locate(name, [f.filename for f in remote_files], root)
    missing = [f.filename for f in remote_files if _kind(directory / f.filename) != "file"]
    if missing:
        raise DataError(
            f"{name} needs {', '.join(missing)} in {directory}: run `ddref download {name}` "
            f"(in Python: load({name!r}, download=True)){_package_hint(name)}, or place the "
            f"files there by hand (from {_sources(remote_files, missing)}) and ddref will "
            f"verify their checksums."
        )
    return {
        remote.filename: _read_verified(name, remote, directory / remote.filename, package)
        for remote in remote_files
    }


def _package_hint(name: str) -> str:
    return "".join(f", install {folder.package} (apt-get install {folder.package})"
                   for folder in SYSTEM_FOLDERS.get(name, ()))


def _sources(remote_files, filenames) -> str:
    """The folders the named files are published in, e.g. ``https://host/mnist/``."""
    folders = [f.urls[0].rsplit("/", 1)[0] + "/" for f in remote_files if f.filename in filenames]
    return ", ".join(dict.fromkeys(folders))
