"""Modules of the repository outside the package (benchmarks/, docs/), for tests."""

import importlib.util
import pathlib
import sys
from types import ModuleType

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def load(relative_path: str, name: str) -> ModuleType:
  """Imports `REPO_ROOT/relative_path` as module `name` (once; its folder is no package).

  Args:
    relative_path: the file, relative to the repository's root.
    name: the name to register it under in `sys.modules`.

  Returns:
    The module.
  """
  if name not in sys.modules:
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / relative_path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
  return sys.modules[name]
