"""Tests of benchmarks/datasets.py (MNIST / CIFAR-10 loaders).

The real-data tests read the files in ``<repo>/../shared/data`` (found through
the loader's repository-relative fallback) and are skipped only if those files
are absent. Nothing here touches the network: the loader's downloader is
replaced by a stub in every test.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import pathlib
import tarfile

import numpy as np
import pytest

import repo_modules

ds = repo_modules.load("benchmarks/datasets.py", "jkfac_benchmarks_datasets")

MNIST_TRAIN_IMAGES_MD5 = "6bbc9ace898e44ae57da46a324031adb"


# --------------------------------------------------------------------------- #
# Fixtures and helpers
# --------------------------------------------------------------------------- #


class _NoNetwork:
    """Stand-in for the downloader: records calls and fails like a machine offline."""

    def __init__(self):
        self.calls: list[tuple[str, pathlib.Path]] = []

    def __call__(self, name, dest):
        self.calls.append((name, pathlib.Path(dest)))
        raise OSError("no network in tests")


@pytest.fixture(autouse=True)
def no_network(monkeypatch, tmp_path):
    """Forbid downloads and isolate the user cache in every test."""
    stub = _NoNetwork()
    monkeypatch.setattr(ds, "_download", stub)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.delenv(ds.ENV_VAR, raising=False)
    return stub


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """Remove every local fallback (repo-relative, cwd-relative, cache) from the search."""
    monkeypatch.setattr(ds, "_REPO_SHARED_DATA", tmp_path / "no-repo-shared" / "data")
    work = tmp_path / "cwd" / "work"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    return tmp_path


def _real_dir(name: str) -> pathlib.Path:
    """The real dataset folder via the loader's fallbacks, or skip."""
    try:
        return ds.find_data_dir(name, download=False)
    except FileNotFoundError:
        pytest.skip(f"real {name} files not found in {ds._REPO_SHARED_DATA} (../shared/data)")


def _write_idx(path: pathlib.Path, array: np.ndarray) -> None:
    """Write ``array`` as an IDX file (gzipped if ``path`` ends in .gz)."""
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D}
    header = bytes([0, 0, codes[array.dtype], array.ndim])
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)


def _synthetic_mnist(folder: pathlib.Path, n_train: int = 3, n_test: int = 2, seed: int = 0):
    """Write a tiny MNIST (train gzipped, test plain) into ``folder``; return the raw arrays."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    raw = {}
    for split, n, suffix in (("train", n_train, ".gz"), ("test", n_test, "")):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=(n,), dtype=np.uint8)
        image_name, label_name = ds.MNIST_FILES[split]
        _write_idx(folder / (image_name + suffix), images)
        _write_idx(folder / (label_name + suffix), labels)
        raw[split] = (images, labels)
    return raw


def _cifar_bytes(images_nhwc: np.ndarray, labels: np.ndarray) -> bytes:
    """Encode images (N, 32, 32, 3) uint8 and labels as CIFAR-10 binary records."""
    planes = images_nhwc.transpose(0, 3, 1, 2).reshape(len(labels), -1)
    return np.concatenate([labels[:, None].astype(np.uint8), planes], axis=1).tobytes()


def _synthetic_cifar(folder: pathlib.Path, sizes=(2, 3), n_test: int = 4, seed: int = 1):
    """Write a tiny CIFAR-10 (data_batch_1.bin plain, the rest gzipped) into ``folder``."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    batches = []
    for k, n in enumerate(sizes, start=1):
        images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, size=(n,), dtype=np.uint8)
        data = _cifar_bytes(images, labels)
        if k == 1:
            (folder / f"data_batch_{k}.bin").write_bytes(data)
        else:
            (folder / f"data_batch_{k}.bin.gz").write_bytes(gzip.compress(data))
        batches.append((images, labels))
    test_images = rng.integers(0, 256, size=(n_test, 32, 32, 3), dtype=np.uint8)
    test_labels = np.arange(n_test, dtype=np.uint8) % 10
    (folder / "test_batch.bin").write_bytes(_cifar_bytes(test_images, test_labels))
    return batches, (test_images, test_labels)


# --------------------------------------------------------------------------- #
# Real files
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("split, n", [("train", 60000), ("test", 10000)])
def test_mnist_real_shapes_dtypes_ranges(split, n):
    _real_dir("mnist")
    x, y = ds.load_mnist(split, download=False)
    assert x.shape == (n, 784) and x.dtype == np.float32
    assert y.shape == (n,) and y.dtype == np.int32
    assert x.min() == 0.0 and x.max() == 1.0
    assert y.min() == 0 and y.max() == 9
    counts = np.bincount(y, minlength=10)
    assert counts.shape == (10,) and counts.sum() == n and (counts > 0).all()


def test_mnist_real_unflattened():
    _real_dir("mnist")
    x, _ = ds.load_mnist("test", download=False, flatten=False)
    x_flat, _ = ds.load_mnist("test", download=False)
    assert x.shape == (10000, 28, 28, 1) and x.dtype == np.float32
    np.testing.assert_array_equal(x.reshape(10000, 784), x_flat)


def test_mnist_real_train_images_are_the_right_file():
    folder = _real_dir("mnist")
    raw = gzip.decompress((folder / "train-images-idx3-ubyte.gz").read_bytes())
    assert hashlib.md5(raw).hexdigest() == MNIST_TRAIN_IMAGES_MD5
    x, _ = ds.load_mnist("train", download=False)
    pixels = np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(60000, 784)
    np.testing.assert_array_equal(np.rint(x * 255).astype(np.uint8), pixels)


def test_cifar10_real_shapes_dtypes_ranges():
    folder = _real_dir("cifar-10")
    n_train = 10000 * len(ds._cifar10_train_files(folder))  # 10,000 in the shared copy
    for split, n in (("train", n_train), ("test", 10000)):
        x, y = ds.load_cifar10(split, download=False)
        assert x.shape == (n, 32, 32, 3) and x.dtype == np.float32
        assert y.shape == (n,) and y.dtype == np.int32
        assert x.min() >= 0.0 and x.max() <= 1.0 and x.max() > 0.9
        assert y.min() == 0 and y.max() == 9
        assert np.bincount(y, minlength=10).sum() == n
    _, y_test = ds.load_cifar10("test", download=False)
    np.testing.assert_array_equal(np.bincount(y_test, minlength=10), np.full(10, 1000))


def test_cifar10_real_pixel_layout_matches_raw_records():
    folder = _real_dir("cifar-10")
    test_file = ds._find_file(folder, "test_batch.bin")
    raw = ds._read_bytes(test_file)
    record = np.frombuffer(raw[: 2 * 3073], dtype=np.uint8).reshape(2, 3073)
    x, y = ds.load_cifar10("test", download=False)
    for i in range(2):
        assert y[i] == record[i, 0]
        planes = record[i, 1:].reshape(3, 32, 32)  # R, G, B planes
        np.testing.assert_array_equal(np.rint(x[i] * 255).astype(np.uint8), planes.transpose(1, 2, 0))


def test_cifar10_real_class_names():
    _real_dir("cifar-10")
    assert ds.cifar10_class_names() == list(ds.CIFAR10_CLASSES)


# --------------------------------------------------------------------------- #
# Synthetic files: parsing and validation
# --------------------------------------------------------------------------- #


def test_synthetic_mnist_round_trip(tmp_path, no_network):
    raw = _synthetic_mnist(tmp_path / "mnist")
    for split in ("train", "test"):
        images, labels = raw[split]
        x, y = ds.load_mnist(split, data_dir=tmp_path / "mnist")
        assert x.dtype == np.float32 and y.dtype == np.int32
        np.testing.assert_allclose(x, images.reshape(len(labels), -1) / 255.0, rtol=1e-6)
        np.testing.assert_array_equal(y, labels)
        x4, _ = ds.load_mnist(split, data_dir=tmp_path / "mnist", flatten=False)
        assert x4.shape == (len(labels), 28, 28, 1)
    assert no_network.calls == []  # found locally: no download attempted


def test_read_idx_multibyte_dtype(tmp_path):
    array = np.arange(24, dtype=np.int32).reshape(2, 3, 4) - 7
    _write_idx(tmp_path / "a.idx.gz", array)
    out = ds.read_idx(tmp_path / "a.idx.gz")
    assert out.dtype == np.int32 and out.shape == (2, 3, 4)
    np.testing.assert_array_equal(out, array)


def test_truncated_idx_raises(tmp_path):
    _synthetic_mnist(tmp_path / "mnist")
    path = tmp_path / "mnist" / "t10k-images-idx3-ubyte"
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(ValueError, match="truncated"):
        ds.load_mnist("test", data_dir=tmp_path / "mnist")
    path.write_bytes(data + b"\0")
    with pytest.raises(ValueError, match="trailing"):
        ds.load_mnist("test", data_dir=tmp_path / "mnist")
    path.write_bytes(data[:10])
    with pytest.raises(ValueError):
        ds.load_mnist("test", data_dir=tmp_path / "mnist")


def test_truncated_gzip_raises(tmp_path):
    _synthetic_mnist(tmp_path / "mnist")
    path = tmp_path / "mnist" / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(ValueError, match="gzip"):
        ds.load_mnist("train", data_dir=tmp_path / "mnist")


def test_wrong_magic_and_count_mismatch_raise(tmp_path):
    folder = tmp_path / "mnist"
    _synthetic_mnist(folder)
    labels = folder / "t10k-labels-idx1-ubyte"
    good = labels.read_bytes()
    _write_idx(labels, np.zeros((2, 28, 28), dtype=np.uint8))  # images where labels belong
    with pytest.raises(ValueError, match="2049"):
        ds.load_mnist("test", data_dir=folder)
    _write_idx(labels, np.zeros((5,), dtype=np.uint8))  # 2 images, 5 labels
    with pytest.raises(ValueError, match="labels"):
        ds.load_mnist("test", data_dir=folder)
    labels.write_bytes(good)
    assert ds.load_mnist("test", data_dir=folder)[0].shape == (2, 784)


def test_returned_arrays_do_not_alias_the_cache(tmp_path):
    _synthetic_mnist(tmp_path / "mnist")
    x, y = ds.load_mnist("test", data_dir=tmp_path / "mnist")
    expected_x, expected_y = x.copy(), y.copy()
    x[:] = -1.0
    y[:] = 99
    x2, y2 = ds.load_mnist("test", data_dir=tmp_path / "mnist")
    np.testing.assert_array_equal(x2, expected_x)
    np.testing.assert_array_equal(y2, expected_y)


def test_synthetic_cifar10_tarball_layout(tmp_path):
    batches, (test_images, test_labels) = _synthetic_cifar(tmp_path / "cifar-10-batches-bin")
    x, y = ds.load_cifar10("train", data_dir=tmp_path)  # finds the tarball subfolder
    assert x.shape == (5, 32, 32, 3) and x.dtype == np.float32 and y.dtype == np.int32
    np.testing.assert_array_equal(np.rint(x * 255).astype(np.uint8),
                                  np.concatenate([b[0] for b in batches]))
    np.testing.assert_array_equal(y, np.concatenate([b[1] for b in batches]))
    xt, yt = ds.load_cifar10("test", data_dir=tmp_path)
    np.testing.assert_array_equal(np.rint(xt * 255).astype(np.uint8), test_images)
    np.testing.assert_array_equal(yt, test_labels)


def test_cifar10_bad_record_size_raises(tmp_path):
    folder = tmp_path / "cifar"
    _synthetic_cifar(folder)
    test_file = folder / "test_batch.bin"
    test_file.write_bytes(test_file.read_bytes()[:-1])
    with pytest.raises(ValueError, match="record size"):
        ds.load_cifar10("test", data_dir=folder)


def test_cifar10_class_names_from_meta_and_default(tmp_path, isolated):
    folder = tmp_path / "cifar"
    _synthetic_cifar(folder)
    assert ds.cifar10_class_names(folder) == list(ds.CIFAR10_CLASSES)  # no meta file
    names = [f"class{i}" for i in range(10)]
    (folder / "batches.meta.txt").write_text("\n".join(names) + "\n\n")
    assert ds.cifar10_class_names(folder) == names


@pytest.mark.parametrize("loader", [ds.load_mnist, ds.load_cifar10])
def test_invalid_split_raises(loader, no_network):
    with pytest.raises(ValueError, match="train, test"):
        loader("validation")
    assert no_network.calls == []


# --------------------------------------------------------------------------- #
# Search order, error message, downloading
# --------------------------------------------------------------------------- #


def test_env_var_takes_precedence_over_fallback(tmp_path, monkeypatch, no_network):
    _synthetic_mnist(tmp_path / "env" / "mnist")
    monkeypatch.setenv(ds.ENV_VAR, str(tmp_path / "env"))
    assert ds.find_data_dir("mnist") == tmp_path / "env" / "mnist"
    x, y = ds.load_mnist("train")
    assert x.shape == (3, 784) and y.shape == (3,)
    # An explicit data_dir beats the environment variable.
    _synthetic_mnist(tmp_path / "explicit", n_train=4)
    assert ds.find_data_dir("mnist", tmp_path / "explicit") == tmp_path / "explicit"
    assert ds.load_mnist("train", data_dir=tmp_path / "explicit")[0].shape == (4, 784)
    assert no_network.calls == []


def test_user_cache_is_searched(isolated, monkeypatch, no_network):
    cache_root = isolated / "xdg"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache_root))
    _synthetic_mnist(cache_root / "jkfac" / "mnist")
    assert ds.find_data_dir("mnist") == cache_root / "jkfac" / "mnist"
    assert no_network.calls == []


def test_missing_data_error_without_download(isolated, monkeypatch, no_network):
    empty = isolated / "empty"
    empty.mkdir()
    monkeypatch.setenv(ds.ENV_VAR, str(empty))
    with pytest.raises(FileNotFoundError) as info:
        ds.load_mnist("train", download=False)
    message = str(info.value)
    assert ds.ENV_VAR in message and "data_dir" in message
    assert "train-images-idx3-ubyte.gz" in message and "download=False" in message
    for folder in ds._search_dirs("mnist", None):
        assert str(folder) in message
    assert no_network.calls == []


def test_missing_data_error_when_download_fails(isolated, no_network):
    with pytest.raises(FileNotFoundError) as info:
        ds.load_cifar10("test")
    message = str(info.value)
    assert ds.ENV_VAR in message and "no network in tests" in message
    assert "test_batch.bin" in message
    cache = isolated / "xdg-cache" / "jkfac" / "cifar-10"
    assert no_network.calls == [("cifar-10", cache)]


def test_download_fills_the_cache(isolated, monkeypatch):
    calls = []

    def fake_download(name, dest):
        calls.append(name)
        _synthetic_cifar(pathlib.Path(dest) / "cifar-10-batches-bin", sizes=(2,))

    monkeypatch.setattr(ds, "_download", fake_download)
    x, y = ds.load_cifar10("train")
    assert x.shape == (2, 32, 32, 3) and calls == ["cifar-10"]
    ds.load_cifar10("test")  # now found in the cache: no second download
    assert calls == ["cifar-10"]


def test_cifar10_download_extracts_only_batch_files(tmp_path, monkeypatch):
    """The real downloader, fed a local tarball instead of the network."""

    src = tmp_path / "src" / "cifar-10-batches-bin"
    _synthetic_cifar(src, sizes=(2,))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in sorted(src.iterdir()):
            tar.add(path, arcname=f"cifar-10-batches-bin/{path.name}")
        evil = b"evil"
        info = tarfile.TarInfo("../escape.txt")
        info.size = len(evil)
        tar.addfile(info, io.BytesIO(evil))
    archive = buffer.getvalue()
    urls = []

    def fake_urlopen(url, timeout):
        urls.append((url, timeout))
        return io.BytesIO(archive)

    monkeypatch.setattr(ds.urllib.request, "urlopen", fake_urlopen)
    monkeypatch.setattr(ds, "CIFAR10_TAR_MD5", hashlib.md5(archive).hexdigest())
    dest = tmp_path / "cache" / "cifar-10"
    ds._download_cifar10(dest)
    assert urls == [(ds.CIFAR10_URL, ds.DOWNLOAD_TIMEOUT_S)]
    assert sorted(p.name for p in dest.rglob("*")) == [
        "cifar-10-batches-bin", "data_batch_1.bin", "test_batch.bin"]
    assert not (tmp_path / "cache" / "escape.txt").exists()
    assert ds.load_cifar10("train", data_dir=dest, download=False)[0].shape == (2, 32, 32, 3)
    # A corrupted download (md5 mismatch) leaves nothing behind.
    monkeypatch.setattr(ds, "CIFAR10_TAR_MD5", "0" * 32)
    with pytest.raises(ValueError, match="md5"):
        ds._download_cifar10(tmp_path / "cache2")
    assert list((tmp_path / "cache2").iterdir()) == []
