"""Dataset loaders for the jkfac benchmarks: MNIST and CIFAR-10.

Pure numpy + standard library. The files are read in their standard on-disk
formats:

* MNIST: the four IDX files (``train-images-idx3-ubyte``,
  ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
  ``t10k-labels-idx1-ubyte``), gzipped (``.gz``) or not.
* CIFAR-10: the binary version, records of 1 label byte followed by 3072
  pixel bytes (R plane, G plane, B plane, 32x32 each), in
  ``data_batch_<k>.bin`` and ``test_batch.bin`` (gzipped or not), with the
  class names in ``batches.meta.txt``. The folder may be the one extracted
  from the original tarball (``cifar-10-batches-bin/``); whatever
  ``data_batch_*`` files are present make up the train split.

Where the files are looked for is described in :func:`find_data_dir`.

Example:
    >>> x_train, y_train = load_mnist("train")   # (60000, 784) float32, (60000,) int32
    >>> x_test, y_test = load_cifar10("test")    # (10000, 32, 32, 3) float32
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import pathlib
import re
import shutil
import sys
import tarfile
import tempfile
import urllib.request
import zlib
from collections.abc import Iterable, Sequence

import numpy as np

__all__ = [
    "CIFAR10_CLASSES",
    "ENV_VAR",
    "MNIST_FILES",
    "SPLITS",
    "cifar10_class_names",
    "find_data_dir",
    "load_cifar10",
    "load_mnist",
    "read_idx",
]

#: Environment variable naming a directory with ``mnist/`` and ``cifar-10/`` subfolders.
ENV_VAR = "JKFAC_DATA_DIR"

#: Valid values of the ``split`` argument of the loaders.
SPLITS = ("train", "test")

#: IDX file names (without ``.gz``) of the MNIST splits: (images, labels).
MNIST_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

#: The standard CIFAR-10 class names, in label order.
CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)

MNIST_IMAGES_MAGIC = 2051
MNIST_LABELS_MAGIC = 2049

CIFAR10_IMAGE_SHAPE = (3, 32, 32)  # as stored: channel planes of rows
CIFAR10_RECORD_BYTES = 1 + 3 * 32 * 32
CIFAR10_TEST_FILE = "test_batch.bin"
CIFAR10_META_FILE = "batches.meta.txt"
CIFAR10_TAR_FOLDER = "cifar-10-batches-bin"
_CIFAR10_TRAIN_RE = re.compile(r"^data_batch_(\d+)\.bin(\.gz)?$")

# Download sources (only used when no local copy is found).
MNIST_MIRRORS = (
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
)
MNIST_GZ_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR10_TAR_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
DOWNLOAD_TIMEOUT_S = 10.0

# Repository-relative fallback: <repo>/../shared/data (the repo is the parent of benchmarks/).
_REPO_SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"

_DATASET_ALIASES = {"mnist": "mnist", "cifar-10": "cifar-10", "cifar10": "cifar-10"}

# IDX type codes -> big-endian numpy dtypes.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


# --------------------------------------------------------------------------- #
# Locating the files
# --------------------------------------------------------------------------- #


def _canonical_name(name: str) -> str:
    """Map a dataset name to its folder name.

    Args:
        name: ``"mnist"``, ``"cifar-10"`` or ``"cifar10"`` (case-insensitive).

    Returns:
        ``"mnist"`` or ``"cifar-10"``.
    """
    key = name.strip().lower()
    if key not in _DATASET_ALIASES:
        raise ValueError(f"Unknown dataset {name!r}; expected one of 'mnist', 'cifar-10'.")
    return _DATASET_ALIASES[key]


def _check_split(split: str) -> str:
    """Validate a split name.

    Args:
        split: The requested split.

    Returns:
        The split, unchanged.
    """
    if split not in SPLITS:
        raise ValueError(f"Invalid split {split!r}; valid splits are: {', '.join(SPLITS)}.")
    return split


def _find_file(directory: pathlib.Path, filename: str) -> pathlib.Path | None:
    """Find ``filename`` or ``filename + '.gz'`` in ``directory``.

    Args:
        directory: Folder to look in.
        filename: Uncompressed file name.

    Returns:
        The path of the uncompressed file if present, else of the gzipped one,
        else ``None``.
    """
    for candidate in (directory / filename, directory / (filename + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def _cifar10_train_files(directory: pathlib.Path) -> list[pathlib.Path]:
    """List the ``data_batch_<k>.bin[.gz]`` files of a folder, ordered by ``k``.

    Args:
        directory: Folder to look in.

    Returns:
        One path per batch number (the uncompressed file if both forms exist).
    """
    if not directory.is_dir():
        return []
    found: dict[int, pathlib.Path] = {}
    for path in directory.iterdir():
        match = _CIFAR10_TRAIN_RE.match(path.name)
        if match is None or not path.is_file():
            continue
        index = int(match.group(1))
        if index not in found or match.group(2) is None:
            found[index] = path
    return [found[k] for k in sorted(found)]


def _has_required_files(name: str, directory: pathlib.Path) -> bool:
    """Whether ``directory`` holds the files of dataset ``name``.

    Args:
        name: Canonical dataset name.
        directory: Candidate folder.

    Returns:
        ``True`` for MNIST if all four IDX files are present; for CIFAR-10 if
        ``test_batch.bin`` and at least one ``data_batch_*.bin`` are present.
    """
    if not directory.is_dir():
        return False
    if name == "mnist":
        return all(
            _find_file(directory, f) is not None for pair in MNIST_FILES.values() for f in pair
        )
    return (
        _find_file(directory, CIFAR10_TEST_FILE) is not None
        and len(_cifar10_train_files(directory)) > 0
    )


def _cache_dir(name: str) -> pathlib.Path:
    """The per-user download cache of a dataset.

    Args:
        name: Canonical dataset name.

    Returns:
        ``$XDG_CACHE_HOME/jkfac/<name>`` (``~/.cache`` if XDG_CACHE_HOME is unset).
    """
    xdg = os.environ.get("XDG_CACHE_HOME")
    root = pathlib.Path(xdg).expanduser() if xdg else pathlib.Path.home() / ".cache"
    return root / "jkfac" / name


def _expand(name: str, roots: Iterable[pathlib.Path]) -> list[pathlib.Path]:
    """Turn search roots into the concrete folders checked for files.

    Args:
        name: Canonical dataset name.
        roots: Folders that may be the dataset folder or hold it as ``<name>/``.

    Returns:
        The folders to check, in order, without duplicates.
    """
    out: list[pathlib.Path] = []
    for root in roots:
        for folder in (root / name, root):
            out.append(folder)
            if name == "cifar-10":
                out.append(folder / CIFAR10_TAR_FOLDER)
    unique: dict[str, pathlib.Path] = {}
    for folder in out:
        unique.setdefault(os.path.abspath(folder), folder)
    return list(unique.values())


def _search_dirs(name: str, data_dir: str | os.PathLike | None) -> list[pathlib.Path]:
    """All local folders that :func:`find_data_dir` checks, in order.

    Args:
        name: Canonical dataset name.
        data_dir: Explicit folder, or ``None``.

    Returns:
        Candidate folders, highest priority first.
    """
    roots: list[pathlib.Path] = []
    if data_dir is not None:
        roots.append(pathlib.Path(data_dir).expanduser())
    env = os.environ.get(ENV_VAR)
    if env:
        roots.append(pathlib.Path(env).expanduser())
    roots.append(_REPO_SHARED_DATA)
    roots.append(pathlib.Path.cwd().parent / "shared" / "data")
    folders = _expand(name, roots)
    cache = _cache_dir(name)
    folders += [cache] + ([cache / CIFAR10_TAR_FOLDER] if name == "cifar-10" else [])
    return folders


def _expected_files_text(name: str) -> str:
    """Describe the files a dataset folder must hold (for error messages).

    Args:
        name: Canonical dataset name.

    Returns:
        A human-readable list of file names.
    """
    if name == "mnist":
        files = [f + ".gz" for pair in MNIST_FILES.values() for f in pair]
        return ", ".join(files) + " (gzipped or not)"
    return (
        "data_batch_1.bin.gz ... data_batch_5.bin.gz (any number of them), "
        "test_batch.bin.gz, batches.meta.txt (gzipped or not; the tarball's "
        f"{CIFAR10_TAR_FOLDER}/ subfolder is also accepted)"
    )


def _not_found_error(
    name: str, searched: Sequence[pathlib.Path], download_note: str
) -> FileNotFoundError:
    """Build the error raised when a dataset cannot be found or downloaded.

    Args:
        name: Canonical dataset name.
        searched: Every folder looked in.
        download_note: What happened with the download attempt.

    Returns:
        The exception (to be raised by the caller).
    """
    places = "\n".join(f"  - {p}" for p in searched)
    return FileNotFoundError(
        f"Could not find the {name} dataset files. Looked in:\n{places}\n"
        f"{download_note}\n"
        f"To fix this, set the environment variable {ENV_VAR} to a directory "
        f"containing a '{name}/' subfolder, or pass data_dir=<folder>, where the "
        f"folder holds: {_expected_files_text(name)}."
    )


def find_data_dir(
    name: str, data_dir: str | os.PathLike | None = None, download: bool = True
) -> pathlib.Path:
    """Find the folder holding a dataset's files, downloading them if needed.

    Folders are tried in this order, and a folder counts only if the required
    files are in it:

    1. ``data_dir`` (the folder itself or its ``<name>/`` subfolder);
    2. ``$JKFAC_DATA_DIR/<name>`` (or ``$JKFAC_DATA_DIR`` itself);
    3. ``<repo>/../shared/data/<name>``, the repository root being the parent
       of ``benchmarks/``;
    4. ``<cwd>/../shared/data/<name>``;
    5. the cache ``$XDG_CACHE_HOME/jkfac/<name>`` (default ``~/.cache/jkfac/<name>``).

    For CIFAR-10, each folder's ``cifar-10-batches-bin/`` subfolder (the layout
    of the original tarball) is also tried. Only if none holds the files, and
    ``download`` is true, are the files downloaded into the cache.

    Args:
        name: ``"mnist"`` or ``"cifar-10"`` (``"cifar10"`` is accepted too).
        data_dir: Optional explicit folder, tried first.
        download: Whether to try downloading into the cache when no local copy
            is found.

    Returns:
        The folder holding the files.

    Raises:
        FileNotFoundError: If no folder holds the files and they could not be
            downloaded; the message lists every folder looked in.
        ValueError: If ``name`` is not a known dataset.
    """
    name = _canonical_name(name)
    searched = _search_dirs(name, data_dir)
    for folder in searched:
        if _has_required_files(name, folder):
            return folder
    if not download:
        raise _not_found_error(name, searched, "Downloading was disabled (download=False).")
    cache = _cache_dir(name)
    try:
        _download(name, cache)
    except Exception as exc:  # noqa: BLE001 - any failure is reported the same way
        raise _not_found_error(
            name, searched, f"Downloading into {cache} failed: {type(exc).__name__}: {exc}"
        ) from exc
    for folder in (cache, cache / CIFAR10_TAR_FOLDER):
        if _has_required_files(name, folder):
            return folder
    raise _not_found_error(
        name, searched, f"Downloading into {cache} did not produce the expected files."
    )


# --------------------------------------------------------------------------- #
# Downloading (only when nothing is found locally)
# --------------------------------------------------------------------------- #


def _fetch(url: str, target: pathlib.Path, md5: str | None) -> None:
    """Download ``url`` to ``target`` atomically, checking its md5.

    Args:
        url: Source address.
        target: Destination file; written only if the download succeeds.
        md5: Expected hex md5 of the content, or ``None`` to skip the check.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"[jkfac.datasets] downloading {url} -> {target}", file=sys.stderr)
    digest = hashlib.md5()
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=target.name + ".", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(
            url, timeout=DOWNLOAD_TIMEOUT_S
        ) as response:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                digest.update(chunk)
                out.write(chunk)
        if md5 is not None and digest.hexdigest() != md5:
            raise ValueError(f"md5 mismatch for {url}: got {digest.hexdigest()}, expected {md5}")
        os.replace(tmp_name, target)
    finally:
        if os.path.exists(tmp_name):
            os.remove(tmp_name)


def _download_mnist(dest: pathlib.Path) -> None:
    """Download the four gzipped MNIST IDX files into ``dest``.

    Args:
        dest: Destination folder.
    """
    for filename, md5 in MNIST_GZ_MD5.items():
        if (dest / filename).is_file():
            continue
        errors = []
        for mirror in MNIST_MIRRORS:
            try:
                _fetch(mirror + filename, dest / filename, md5)
                break
            except Exception as exc:  # noqa: BLE001 - try the next mirror
                errors.append(f"{mirror}: {exc}")
        else:
            raise OSError(f"could not download {filename}: " + "; ".join(errors))


def _download_cifar10(dest: pathlib.Path) -> None:
    """Download and extract the CIFAR-10 binary tarball into ``dest``.

    Only the regular files of ``cifar-10-batches-bin/`` are extracted, by base
    name, so the archive cannot write outside ``dest``.

    Args:
        dest: Destination folder; files end up in ``dest/cifar-10-batches-bin/``.
    """
    archive = dest / "cifar-10-binary.tar.gz"
    if not archive.is_file():
        _fetch(CIFAR10_URL, archive, CIFAR10_TAR_MD5)
    out_dir = dest / CIFAR10_TAR_FOLDER
    out_dir.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            base = pathlib.PurePosixPath(member.name).name
            wanted = _CIFAR10_TRAIN_RE.match(base) or base in (CIFAR10_TEST_FILE, CIFAR10_META_FILE)
            if not (member.isfile() and wanted):
                continue
            source = tar.extractfile(member)
            if source is None:
                continue
            partial = out_dir / (base + ".part")
            with source, open(partial, "wb") as target:
                shutil.copyfileobj(source, target)
            os.replace(partial, out_dir / base)
    archive.unlink()


def _download(name: str, dest: pathlib.Path) -> None:
    """Download dataset ``name`` into ``dest`` (tests replace this function).

    Args:
        name: Canonical dataset name.
        dest: Destination folder (the cache).
    """
    if name == "mnist":
        _download_mnist(dest)
    else:
        _download_cifar10(dest)


# --------------------------------------------------------------------------- #
# Parsing
# --------------------------------------------------------------------------- #


def _read_bytes(path: pathlib.Path) -> bytes:
    """Read a file, gunzipping it if its name ends in ``.gz``.

    Args:
        path: File to read.

    Returns:
        The (decompressed) content.

    Raises:
        ValueError: If the gzip stream is corrupt or truncated.
    """
    with open(path, "rb") as raw:
        if path.suffix != ".gz":
            return raw.read()
        try:
            with gzip.GzipFile(fileobj=raw) as stream:
                return stream.read()
        except (OSError, EOFError, zlib.error) as exc:
            raise ValueError(f"{path}: corrupt or truncated gzip file ({exc}).") from exc


def _parse_idx(data: bytes, source: str) -> tuple[int, np.ndarray]:
    """Parse the content of an IDX file.

    Args:
        data: Raw (uncompressed) bytes.
        source: Name used in error messages.

    Returns:
        ``(magic, array)``, the array in native byte order with the shape of
        the header, read-only.

    Raises:
        ValueError: On a bad magic number or a size that does not match the header.
    """
    if len(data) < 4:
        raise ValueError(f"{source}: too short for an IDX header ({len(data)} bytes).")
    magic = int.from_bytes(data[:4], "big")
    zero, type_code, ndim = int.from_bytes(data[:2], "big"), data[2], data[3]
    if zero != 0 or type_code not in _IDX_DTYPES or ndim == 0:
        raise ValueError(f"{source}: not an IDX file (magic number {magic:#010x}).")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{source}: truncated IDX header.")
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = _IDX_DTYPES[type_code]
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        kind = "truncated" if len(data) < expected else "has trailing bytes"
        raise ValueError(
            f"{source}: IDX file {kind}: header dims {dims} need {expected} bytes, "
            f"found {len(data)}."
        )
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    if dtype.itemsize > 1:
        array = array.astype(dtype.newbyteorder("="))
    array.setflags(write=False)
    return magic, array


@functools.lru_cache(maxsize=16)
def _read_idx_cached(path: str, mtime_ns: int, size: int) -> tuple[int, np.ndarray]:
    """Parse an IDX file, cached on its path, modification time and size.

    Args:
        path: File path.
        mtime_ns: Modification time (cache key only).
        size: File size (cache key only).

    Returns:
        ``(magic, read-only array)``.
    """
    del mtime_ns, size
    return _parse_idx(_read_bytes(pathlib.Path(path)), path)


def _stat_key(path: pathlib.Path) -> tuple[str, int, int]:
    """Cache key of a file: absolute path, mtime and size.

    Args:
        path: File path.

    Returns:
        ``(path, mtime_ns, size)``.
    """
    stat = path.stat()
    return str(path.resolve()), stat.st_mtime_ns, stat.st_size


def read_idx(path: str | os.PathLike, expected_magic: int | None = None) -> np.ndarray:
    """Read an IDX file (gzipped if its name ends in ``.gz``).

    Args:
        path: File path.
        expected_magic: If given, the magic number the file must have
            (2051 for MNIST images, 2049 for MNIST labels).

    Returns:
        A read-only array with the dtype and shape given by the header.

    Raises:
        ValueError: If the file is corrupt, truncated or has another magic number.
    """
    path = pathlib.Path(path)
    magic, array = _read_idx_cached(*_stat_key(path))
    if expected_magic is not None and magic != expected_magic:
        raise ValueError(f"{path}: magic number {magic}, expected {expected_magic}.")
    return array


def _read_cifar10_batch(path: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 binary batch file (cached).

    Args:
        path: File path (``.bin`` or ``.bin.gz``).

    Returns:
        Read-only ``uint8`` images ``(N, 32, 32, 3)`` and labels ``(N,)``.
    """
    return _read_cifar10_batch_cached(*_stat_key(path))


@functools.lru_cache(maxsize=16)
def _read_cifar10_batch_cached(path: str, mtime_ns: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Parse a CIFAR-10 binary batch, cached on path, modification time and size.

    Args:
        path: File path.
        mtime_ns: Modification time (cache key only).
        size: File size (cache key only).

    Returns:
        Read-only ``uint8`` images ``(N, 32, 32, 3)`` (NHWC) and labels ``(N,)``.

    Raises:
        ValueError: If the size is not a positive multiple of the record size
            or a label is out of range.
    """
    del mtime_ns, size
    data = _read_bytes(pathlib.Path(path))
    if len(data) == 0 or len(data) % CIFAR10_RECORD_BYTES != 0:
        raise ValueError(
            f"{path}: size {len(data)} bytes is not a positive multiple of the "
            f"CIFAR-10 record size {CIFAR10_RECORD_BYTES} (1 label + 3072 pixels)."
        )
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, CIFAR10_RECORD_BYTES)
    labels = np.ascontiguousarray(records[:, 0])
    if labels.max() >= len(CIFAR10_CLASSES):
        raise ValueError(f"{path}: label {int(labels.max())} out of range 0..9.")
    planes = records[:, 1:].reshape(-1, *CIFAR10_IMAGE_SHAPE)
    images = np.ascontiguousarray(planes.transpose(0, 2, 3, 1))
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def _to_unit_float(images: np.ndarray) -> np.ndarray:
    """Scale ``uint8`` pixels to float32 in [0, 1] (a new, writable array).

    Args:
        images: ``uint8`` array.

    Returns:
        ``images / 255`` as float32.
    """
    out = images.astype(np.float32)
    out /= np.float32(255.0)
    return out


# --------------------------------------------------------------------------- #
# Public loaders
# --------------------------------------------------------------------------- #


def load_mnist(
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    download: bool = True,
    flatten: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Load an MNIST split.

    Args:
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000 images).
        data_dir: Optional folder holding the IDX files (see :func:`find_data_dir`).
        download: Whether to download the files if no local copy is found.
        flatten: If true, images have shape ``(N, 784)``; else ``(N, 28, 28, 1)``.

    Returns:
        ``(images, labels)``: float32 images in [0, 1] and int32 labels in 0..9.
        Both are fresh arrays the caller may modify.

    Raises:
        ValueError: On an invalid split or a corrupt/truncated/mismatched file.
        FileNotFoundError: If the files can be neither found nor downloaded.
    """
    _check_split(split)
    directory = find_data_dir("mnist", data_dir, download=download)
    image_name, label_name = MNIST_FILES[split]
    image_path = _find_file(directory, image_name)
    label_path = _find_file(directory, label_name)
    assert image_path is not None and label_path is not None  # ensured by find_data_dir
    images = read_idx(image_path, expected_magic=MNIST_IMAGES_MAGIC)
    labels = read_idx(label_path, expected_magic=MNIST_LABELS_MAGIC)
    if images.ndim != 3 or labels.ndim != 1:
        raise ValueError(f"{directory}: unexpected MNIST shapes {images.shape}, {labels.shape}.")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{directory}: {images.shape[0]} images but {labels.shape[0]} labels in split {split!r}."
        )
    if labels.size and labels.max() > 9:
        raise ValueError(f"{label_path}: label {int(labels.max())} out of range 0..9.")
    x = images.reshape(images.shape[0], -1) if flatten else images[..., None]
    return _to_unit_float(x), labels.astype(np.int32)


def load_cifar10(
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    download: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Load a CIFAR-10 split from the binary batch files.

    The train split is the concatenation of every ``data_batch_<k>.bin[.gz]``
    present, in order of ``k`` (50,000 images for the full dataset).

    Args:
        split: ``"train"`` or ``"test"``.
        data_dir: Optional folder holding the batch files (see :func:`find_data_dir`).
        download: Whether to download the files if no local copy is found.

    Returns:
        ``(images, labels)``: float32 images in [0, 1] of shape ``(N, 32, 32, 3)``
        (NHWC, RGB) and int32 labels in 0..9. Both are fresh arrays.

    Raises:
        ValueError: On an invalid split or a file whose size is not a multiple
            of the record size.
        FileNotFoundError: If the files can be neither found nor downloaded.
    """
    _check_split(split)
    directory = find_data_dir("cifar-10", data_dir, download=download)
    if split == "train":
        paths = _cifar10_train_files(directory)
    else:
        test_path = _find_file(directory, CIFAR10_TEST_FILE)
        assert test_path is not None  # ensured by find_data_dir
        paths = [test_path]
    batches = [_read_cifar10_batch(p) for p in paths]
    images = np.concatenate([b[0] for b in batches]) if len(batches) > 1 else batches[0][0]
    labels = np.concatenate([b[1] for b in batches]) if len(batches) > 1 else batches[0][1]
    return _to_unit_float(images), labels.astype(np.int32)


def cifar10_class_names(data_dir: str | os.PathLike | None = None) -> list[str]:
    """The CIFAR-10 class names, in label order.

    Read from ``batches.meta.txt`` next to the batch files when a local copy is
    found (never downloads); otherwise the standard names are returned.

    Args:
        data_dir: Optional folder holding the CIFAR-10 files.

    Returns:
        Ten class names, e.g. ``["airplane", "automobile", ...]``.

    Raises:
        ValueError: If ``batches.meta.txt`` does not list exactly ten names.
    """
    try:
        directory = find_data_dir("cifar-10", data_dir, download=False)
    except FileNotFoundError:
        return list(CIFAR10_CLASSES)
    meta = directory / CIFAR10_META_FILE
    if not meta.is_file():
        return list(CIFAR10_CLASSES)
    names = [line.strip() for line in meta.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(names) != len(CIFAR10_CLASSES):
        raise ValueError(f"{meta}: expected {len(CIFAR10_CLASSES)} class names, found {len(names)}.")
    return names
