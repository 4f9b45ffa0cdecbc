"""benchmarks/datasets.py: the readers of ../shared/data's standard files.

The real-data tests read `<repo>/../shared/data` and are skipped only if its
files are absent; the format tests write small files of their own.
"""

from __future__ import annotations

import gzip
import hashlib

import numpy as np
import pytest

import repo_modules

ds = repo_modules.load("benchmarks/datasets.py", "jkfac_benchmarks_datasets")

MNIST_TRAIN_IMAGES_MD5 = "6bbc9ace898e44ae57da46a324031adb"
PYDOCS_MD5 = {"train": "c2d9a6d39a9ca8d80b427f00db49e0fe",
              "valid": "bba82459689775da485313c0d45677c3"}


def _real_dir(name):
  try:
    return ds.find_data_dir(name)
  except FileNotFoundError:
    pytest.skip(f"no {name} files in {ds.SHARED_DATA}")


def _write_idx(path, array):
  codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C}
  header = bytes([0, 0, codes[array.dtype], array.ndim])
  header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
  payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
  path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)


def test_mnist_is_the_standard_file_scaled_to_the_unit_interval():
  folder = _real_dir("mnist")
  raw = gzip.decompress((folder / "train-images-idx3-ubyte.gz").read_bytes())
  assert hashlib.md5(raw).hexdigest() == MNIST_TRAIN_IMAGES_MD5
  x, y = ds.load_mnist("train")
  assert x.shape == (60000, 784) and x.dtype == np.float32 and y.dtype == np.int32
  pixels = np.frombuffer(raw, np.uint8, offset=16).reshape(60000, 784)
  np.testing.assert_array_equal(np.rint(x * 255).astype(np.uint8), pixels)
  assert np.bincount(y, minlength=10).min() > 5000
  x_test, _ = ds.load_mnist("test", flatten=False)
  assert x_test.shape == (10000, 28, 28, 1)


def test_cifar10_records_are_read_as_rgb_images():
  folder = _real_dir("cifar-10")
  raw = gzip.decompress((folder / "test_batch.bin.gz").read_bytes())
  records = np.frombuffer(raw[:2 * 3073], np.uint8).reshape(2, 3073)
  x, y = ds.load_cifar10("test")
  assert x.shape == (10000, 32, 32, 3) and x.dtype == np.float32
  np.testing.assert_array_equal(np.bincount(y, minlength=10), np.full(10, 1000))
  for i in range(2):
    assert y[i] == records[i, 0]
    planes = records[i, 1:].reshape(3, 32, 32)  # R, G, B planes
    np.testing.assert_array_equal(np.rint(x[i] * 255).astype(np.uint8),
                                  planes.transpose(1, 2, 0))
  assert ds.load_cifar10("train")[0].shape == (10000, 32, 32, 3)
  assert ds.cifar10_class_names()[:2] == ["airplane", "automobile"]


@pytest.mark.parametrize("split, size", [("train", 10_579_277), ("valid", 469_988)])
def test_pydocs_is_the_text_as_bytes(split, size):
  _real_dir("pydocs")
  text = ds.load_pydocs(split)
  assert text.dtype == np.uint8 and text.shape == (size,)
  assert hashlib.md5(text.tobytes()).hexdigest() == PYDOCS_MD5[split]


def test_idx_files_gzipped_or_not_and_a_folder_given(tmp_path, monkeypatch):
  monkeypatch.delenv(ds.ENV_VAR, raising=False)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
  labels = np.array([1, 2, 3], np.uint8)
  folder = tmp_path / "mnist"
  folder.mkdir()
  _write_idx(folder / "train-images-idx3-ubyte.gz", images)
  _write_idx(folder / "train-labels-idx1-ubyte", labels)
  x, y = ds.load_mnist("train", data_dir=tmp_path)  # the folder holding mnist/
  np.testing.assert_allclose(x, images.reshape(3, -1) / 255.0, rtol=1e-6)
  np.testing.assert_array_equal(y, labels)
  wide = np.arange(6, dtype=np.int32).reshape(2, 3) - 3
  _write_idx(tmp_path / "wide.idx", wide)
  np.testing.assert_array_equal(ds.read_idx(tmp_path / "wide.idx"), wide)
  (tmp_path / "short.idx").write_bytes((tmp_path / "wide.idx").read_bytes()[:-1])
  with pytest.raises(ValueError, match="needs 24"):
    ds.read_idx(tmp_path / "short.idx")


def test_a_missing_dataset_names_the_folders_tried_and_the_fix(tmp_path, monkeypatch):
  monkeypatch.setenv(ds.ENV_VAR, str(tmp_path))
  monkeypatch.setattr(ds, "SHARED_DATA", tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="JKFAC_DATA_DIR") as error:
    ds.load_cifar10("test")
  assert str(tmp_path / "cifar-10") in str(error.value)
