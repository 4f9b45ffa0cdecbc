"""The documentation site builds (`mkdocs build --strict`), complete, and the
docstrings pass their linters (pydoclint, ruff's pydocstyle rules).

The site is built once into a temporary folder: the pages of docs/, the
notebooks of examples/ (mkdocs-jupyter, not executed: tests/test_examples.py
runs them) and the API reference (mkdocstrings) of every public module. The
linters also run on a module made up with a broken docstring, so that a
linter that stopped checking would be noticed.
"""

from __future__ import annotations

import os
import pathlib
import pkgutil
import subprocess
import sys

import pytest

import jkfac
import repo_modules

pytestmark = pytest.mark.skipif(os.environ.get("JKFAC_SKIP_DOCS_AND_NOTEBOOKS") == "1",
                                reason="JKFAC_SKIP_DOCS_AND_NOTEBOOKS=1: the docs build "
                                       "ran in another suite (see tests/test_examples.py)")

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
BIN = pathlib.Path(sys.executable).parent


def _run(*command: str, cwd: pathlib.Path = REPO_ROOT) -> subprocess.CompletedProcess:
  env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
  return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=600, check=False)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> pathlib.Path:
  output = tmp_path_factory.mktemp("site")
  built = _run(sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(output))
  assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
  return output


def test_every_public_name_is_documented_on_the_package_page(site):
  html = (site / "reference" / "jkfac" / "index.html").read_text(encoding="utf-8")
  missing = [name for name in jkfac.__all__
             if f'id="jkfac.{name}"' not in html and f'id="jkfac.{name}.{name}"' not in html]
  assert not missing, missing


def test_every_public_module_and_notebook_has_a_page(site):
  modules = ["jkfac"] + [m.name for m in pkgutil.walk_packages(jkfac.__path__, "jkfac.")
                         if not any(part.startswith("_") for part in m.name.split("."))]
  assert sorted(repo_modules.load("docs/hooks.py", "jkfac_docs_hooks").public_modules()) == \
      sorted(modules)
  for name in modules:
    assert (site / "reference" / name / "index.html").is_file(), name
  page = (site / "reference" / "jkfac.preconditioner" / "index.html").read_text(
      encoding="utf-8")
  assert 'id="jkfac.preconditioner.scale_by_kfac"' in page and "shard_state" in page
  for notebook in sorted((REPO_ROOT / "examples").glob("*.ipynb")):
    assert (site / "examples" / notebook.stem / "index.html").is_file(), notebook.name
    assert f"examples/{notebook.name}" in (REPO_ROOT / "docs" / "index.md").read_text()


def test_the_docstrings_pass_the_linters():
  for command in ((str(BIN / "pydoclint"), "--config=pyproject.toml", "src/jkfac"),
                  (str(BIN / "ruff"), "check", "--quiet", "src/jkfac")):
    result = _run(*command)
    assert result.returncode == 0, (command, result.stdout[-3000:], result.stderr[-3000:])


def test_the_linters_find_a_broken_docstring(tmp_path):
  (tmp_path / "pyproject.toml").write_text((REPO_ROOT / "pyproject.toml").read_text())
  (tmp_path / "broken.py").write_text(
      '"""A module."""\n\n\ndef scale(x: float, factor: float) -> float:\n'
      '  """Scales a number.\n\n  Args:\n    x: the number.\n\n  Returns:\n'
      '    The product.\n  """\n  return x * factor\n\n\ndef undocumented(x):\n'
      '  return x\n')
  pydoclint = _run(str(BIN / "pydoclint"), "--config=pyproject.toml", "broken.py", cwd=tmp_path)
  assert pydoclint.returncode != 0 and "DOC101" in pydoclint.stdout + pydoclint.stderr
  ruff = _run(str(BIN / "ruff"), "check", "broken.py", cwd=tmp_path)
  assert ruff.returncode != 0 and "D103" in ruff.stdout
