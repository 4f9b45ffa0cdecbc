"""Test configuration.

Eight CPU devices for the multi-device tests (set before JAX starts), and
float64 enabled so that brute-force comparisons can be tight; tests that
check float32 behaviour make float32 arrays explicitly. OpenBLAS (behind
LAPACK's eigensolver) runs single-threaded: with pytest-xdist workers
sharing the cores, its spinning threads make `eigh` a hundred times slower.
XLA:CPU compiles without its backend (LLVM) optimisations, with its older
(elemental) emitters for fusions instead of the MLIR fusion emitters, and in
one piece (no parallel code generation, the cores being taken by the
workers): the tests' small programs spend far longer compiling than running,
and the flags change how fast the code compiles and runs, not what it
computes (the first a fifth off the suite's time; the fusion emitters' flag
cuts a training step's compilation two- to three-fold, on JAX 0.8 and 0.10).
Compiled programs are cached in `.jax_cache/` (git-ignored), which the
workers share.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false "
                      "--xla_cpu_parallel_codegen_split_count=1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# A compilation cache shared by the pytest-xdist workers (and kept between
# runs): many tests compile the same programs (the one-device references of
# the multi-device tests, the brute-force models' steps).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # pylint: disable=g-import-not-at-top

jax.config.update("jax_enable_x64", True)

# The modules whose tests take longest (notebooks, multi-device runs, model
# zoo, scans), run first: with `pytest -n 2` the workers then share out the
# long tests early and end on short ones, instead of one worker finishing a
# 30-second test alone.
_LONG_FIRST = ("test_examples.py", "test_multidevice.py", "test_zoo.py", "test_scan.py",
               "test_state_layout.py")


def pytest_collection_modifyitems(config, items):
  """Orders the collected tests: the long modules first (see `_LONG_FIRST`)."""
  del config  # unused
  rank = lambda item: next((i for i, name in enumerate(_LONG_FIRST)
                            if item.path.name == name), len(_LONG_FIRST))
  items.sort(key=rank)  # stable: each module's own order kept
