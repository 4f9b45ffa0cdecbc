"""Runs every notebook in examples/ top to bottom and checks that no cell fails.

Each notebook is executed with nbclient in a fresh IPython kernel running this
very interpreter (a kernel spec written to a temporary folder and put first on
JUPYTER_PATH, so that no "python3" kernel spec of another environment is
picked up). Most notebooks train on MNIST, `convnet.ipynb` on CIFAR-10 and
`custom_tags.ipynb` on data it makes up (`DATASETS`): a notebook's test is
skipped only if its dataset's files cannot be found locally (nothing is
downloaded); the folder found is passed to the kernel through
JKFAC_DATA_DIR. The kernel inherits the environment (XLA_FLAGS included: the
multi-device notebook uses conftest.py's eight CPU devices) but not this
process's JAX configuration, so the notebooks run in float32 as they would for
a user. `convnet.ipynb` alone is compiled with LLVM's optimisations at level 1
(`OPT_LEVELS`): its convolutions run several times slower unoptimised.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import sys

import nbclient
import nbformat
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES_DIR = REPO_ROOT / "examples"
NOTEBOOKS = sorted(EXAMPLES_DIR.glob("*.ipynb"))
TIMEOUT_S = 600  # per cell

# CI runs the notebooks and the docs build once, on the newest JAX (.ci/run
# sets this for its second suite, on the oldest supported JAX, to stay within
# its time budget).
pytestmark = pytest.mark.skipif(os.environ.get("JKFAC_SKIP_DOCS_AND_NOTEBOOKS") == "1",
                                reason="JKFAC_SKIP_DOCS_AND_NOTEBOOKS=1: they ran in "
                                       "another suite")
# The dataset each notebook reads ("mnist" when not listed; None: no files).
DATASETS = {"convnet.ipynb": "cifar-10", "custom_tags.ipynb": None}
# The kernel's --xla_backend_optimization_level where it is not conftest.py's 0:
# the convnet's 30 steps and its evaluation on 10,000 images take a quarter
# less time, compilation included (measured on two CPU cores).
OPT_LEVELS = {"convnet.ipynb": 1}


def _data_dir(dataset: str) -> pathlib.Path | None:
  """The folder holding a dataset's files (as the loader finds it), or None."""
  name = "jkfac_benchmarks_datasets"
  module = sys.modules.get(name)
  if module is None:
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "benchmarks" / "datasets.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
  try:
    return module.find_data_dir(dataset)
  except FileNotFoundError:
    return None


@pytest.fixture
def kernel_env(tmp_path, monkeypatch):
  """A "python3" kernel spec for this interpreter, first on JUPYTER_PATH."""
  spec_dir = tmp_path / "jupyter" / "kernels" / "python3"
  spec_dir.mkdir(parents=True)
  (spec_dir / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": f"Python {sys.version_info[0]}.{sys.version_info[1]} (tests)",
      "language": "python",
  }))
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
  # Headless plotting in the kernel, whatever the notebook asks for.
  monkeypatch.setenv("MPLBACKEND", "Agg")
  # One LAPACK thread: the eigendecompositions of K-FAC's inverse refreshes go
  # through OpenBLAS, whose threads spin when the cores are busy (as under
  # `pytest -n 2` on two cores), making a refresh a hundred times slower.
  if "OPENBLAS_NUM_THREADS" not in os.environ:
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")


def test_examples_exist():
  assert NOTEBOOKS, f"no notebooks found in {EXAMPLES_DIR}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, kernel_env, monkeypatch):
  dataset = DATASETS.get(path.name, "mnist")
  if dataset is not None:
    data_dir = _data_dir(dataset)
    if data_dir is None:
      pytest.skip(f"{dataset} files not found (looked in $JKFAC_DATA_DIR, "
                  f"<repo>/../shared/data and the jkfac cache); {path.name} trains on them.")
    monkeypatch.setenv("JKFAC_DATA_DIR", str(data_dir))
  if path.name in OPT_LEVELS:
    flags = [flag for flag in os.environ.get("XLA_FLAGS", "").split()
             if not flag.startswith("--xla_backend_optimization_level")]
    flags.append(f"--xla_backend_optimization_level={OPT_LEVELS[path.name]}")
    monkeypatch.setenv("XLA_FLAGS", " ".join(flags))

  nb = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(
      nb, timeout=TIMEOUT_S, kernel_name="python3",
      resources={"metadata": {"path": str(EXAMPLES_DIR)}})
  try:
    client.execute()
  except nbclient.exceptions.CellExecutionError as error:
    pytest.fail(f"{path.name}: a cell failed:\n{error}", pytrace=False)

  for cell in nb.cells:
    if cell.cell_type != "code":
      continue
    errors = [out for out in cell.get("outputs", []) if out.get("output_type") == "error"]
    assert not errors, f"{path.name}: cell {cell.source[:80]!r} raised {errors[0]['ename']}"
