"""Readers of the benchmarks' datasets in their standard files: MNIST, CIFAR-10, pydocs.

The files are those of `../shared/data` (see its README), read with numpy and
the standard library; nothing is downloaded:

* MNIST: the four IDX files (`train-images-idx3-ubyte.gz`, ...);
* CIFAR-10: the binary batches (`data_batch_<k>.bin.gz`, `test_batch.bin.gz`,
  records of 1 label byte and 3,072 pixel bytes, R, G then B planes) and the
  class names in `batches.meta.txt`;
* pydocs: English text (`train.txt.gz`, `valid.txt.gz`), read as bytes.

Files may be gzipped or not. A dataset's folder is `data_dir` (or its
`<name>/` subfolder), else `$JKFAC_DATA_DIR/<name>`, else
`<repository>/../shared/data/<name>`.

Example:
    >>> x_train, y_train = load_mnist("train")   # (60000, 784) float32, (60000,) int32
    >>> x_test, y_test = load_cifar10("test")    # (10000, 32, 32, 3) float32
"""

from __future__ import annotations

import functools
import gzip
import os
import pathlib

import numpy as np

ENV_VAR = "JKFAC_DATA_DIR"
"""Environment variable naming a folder with `mnist/`, `cifar-10/` and `pydocs/`."""
SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
"""`../shared/data` beside the repository."""
MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
CIFAR10_FILES = {"train": "data_batch_1.bin", "test": "test_batch.bin"}
PYDOCS_FILES = {"train": "train.txt", "valid": "valid.txt"}
_REQUIRED = {"mnist": MNIST_FILES["train"][0], "cifar-10": CIFAR10_FILES["test"],
             "pydocs": PYDOCS_FILES["valid"]}
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_CIFAR10_RECORD = 1 + 32 * 32 * 3


def _file(folder: pathlib.Path, name: str) -> pathlib.Path | None:
  """`folder/name.gz` or `folder/name`, whichever exists."""
  for path in (folder / (name + ".gz"), folder / name):
    if path.is_file():
      return path
  return None


def find_data_dir(name: str, data_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """The folder holding a dataset's files.

  Args:
    name: `"mnist"`, `"cifar-10"` or `"pydocs"`.
    data_dir: a folder to try first (the dataset's own, or one holding it).

  Returns:
    The first of `data_dir`, `data_dir/<name>`, `$JKFAC_DATA_DIR/<name>`,
    `$JKFAC_DATA_DIR` and `../shared/data/<name>` that holds its files.

  Raises:
    FileNotFoundError: none does; the message lists the folders tried.
  """
  if name not in _REQUIRED:
    raise ValueError(f"unknown dataset {name!r}: one of {sorted(_REQUIRED)}.")
  tried = []
  for root in ([pathlib.Path(data_dir)] if data_dir is not None else []) + (
      [pathlib.Path(os.environ[ENV_VAR])] if os.environ.get(ENV_VAR) else []):
    tried += [root, root / name]
  tried.append(SHARED_DATA / name)
  for folder in tried:
    if _file(folder, _REQUIRED[name]) is not None:
      return folder
  raise FileNotFoundError(
      f"no {name} files ({_REQUIRED[name]}[.gz], ...) in any of: "
      f"{', '.join(map(str, tried))}. Pass data_dir=<folder> (--data-dir), or set "
      f"${ENV_VAR} to a folder holding a '{name}/' subfolder.")


@functools.lru_cache(maxsize=16)
def _read(path: pathlib.Path) -> bytes:
  with (gzip.open(path) if path.suffix == ".gz" else open(path, "rb")) as f:
    return f.read()


def read_idx(path: str | os.PathLike) -> np.ndarray:
  """An IDX file's array (gzipped or not), in native byte order.

  Args:
    path: the file.

  Returns:
    The array, of the shape and dtype its header gives.

  Raises:
    ValueError: the header is not IDX's or the data is not as long as it says.
  """
  data = _read(pathlib.Path(path))
  if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in _IDX_DTYPES:
    raise ValueError(f"{path}: not an IDX file (header {data[:4]!r}).")
  ndim = data[3]
  shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
  dtype = np.dtype(_IDX_DTYPES[data[2]])
  body = data[4 + 4 * ndim:]
  if len(body) != dtype.itemsize * int(np.prod(shape)):
    raise ValueError(f"{path}: {len(body)} bytes of data, the header's shape {shape} "
                     f"needs {dtype.itemsize * int(np.prod(shape))}.")
  return np.frombuffer(body, dtype).reshape(shape).astype(dtype.newbyteorder("="))


def load_mnist(split: str = "train", data_dir: str | os.PathLike | None = None,
               flatten: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """An MNIST split.

  Args:
    split: `"train"` (60,000 images) or `"test"` (10,000).
    data_dir: the folder of the IDX files (see `find_data_dir`).
    flatten: images of shape `(N, 784)`; else `(N, 28, 28, 1)`.

  Returns:
    float32 images in [0, 1] and int32 labels.
  """
  folder = find_data_dir("mnist", data_dir)
  images, labels = (read_idx(_file(folder, name)) for name in MNIST_FILES[split])
  images = images.reshape(len(images), -1) if flatten else images[..., None]
  return images.astype(np.float32) / 255.0, labels.astype(np.int32)


def load_cifar10(split: str = "train", data_dir: str | os.PathLike | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
  """A CIFAR-10 split.

  Args:
    split: `"train"` or `"test"`.
    data_dir: the folder of the binary batches (see `find_data_dir`).

  Returns:
    float32 images in [0, 1] of shape `(N, 32, 32, 3)` (RGB) and int32 labels;
    the train split is every `data_batch_<k>` file present, in order of `k`.
  """
  folder = find_data_dir("cifar-10", data_dir)
  names = ([f"data_batch_{k}.bin" for k in range(1, 6)] if split == "train"
           else [CIFAR10_FILES[split]])
  paths = [path for path in (_file(folder, name) for name in names) if path is not None]
  data = np.concatenate([np.frombuffer(_read(path), np.uint8) for path in paths])
  if data.size % _CIFAR10_RECORD:
    raise ValueError(f"{folder}: {data.size} bytes of {split} records, not a whole "
                     f"number of {_CIFAR10_RECORD}-byte records.")
  records = data.reshape(-1, _CIFAR10_RECORD)
  images = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return images.astype(np.float32) / 255.0, records[:, 0].astype(np.int32)


def cifar10_class_names(data_dir: str | os.PathLike | None = None) -> list[str]:
  """CIFAR-10's class names in label order, from `batches.meta.txt`.

  Args:
    data_dir: the folder of the CIFAR-10 files (see `find_data_dir`).

  Returns:
    Ten names.
  """
  meta = find_data_dir("cifar-10", data_dir) / "batches.meta.txt"
  return [line.strip() for line in meta.read_text(encoding="utf-8").splitlines()
          if line.strip()]


def load_pydocs(split: str = "train", data_dir: str | os.PathLike | None = None) -> np.ndarray:
  """A split of the pydocs text as bytes (for byte-level language models).

  Args:
    split: `"train"` (10,579,277 bytes) or `"valid"` (469,988 bytes).
    data_dir: the folder of `train.txt.gz` and `valid.txt.gz`.

  Returns:
    A uint8 array of the text's UTF-8 bytes.
  """
  path = _file(find_data_dir("pydocs", data_dir), PYDOCS_FILES[split])
  return np.frombuffer(_read(path), np.uint8)
