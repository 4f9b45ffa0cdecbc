"""The documentation (docs/build.py) builds, complete, and its docstring check passes.

The site is built once into a temporary folder: the API reference (pdoc) of
every public module, and the Markdown pages of docs/. The docstring rules are
also checked on a small package made up for the purpose, so that a rule that
stopped firing would be noticed.
"""

from __future__ import annotations

import importlib
import inspect
import os
import pathlib
import re
import sys
import textwrap
from typing import Optional

import pytest

import jkfac
import repo_modules

pytestmark = pytest.mark.skipif(os.environ.get("JKFAC_SKIP_DOCS_AND_NOTEBOOKS") == "1",
                                reason="JKFAC_SKIP_DOCS_AND_NOTEBOOKS=1: the docs build "
                                       "ran in another suite (see tests/test_examples.py)")

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


build = repo_modules.load("docs/build.py", "jkfac_docs_build")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> pathlib.Path:
  output = tmp_path_factory.mktemp("docs")
  index = build.build(output)
  assert index == output / "index.html" and index.is_file()
  return output


def test_docstring_check_passes():
  problems = build.check_docstrings()
  assert not problems, "\n".join(map(str, problems))


def test_every_public_name_is_documented(site):
  page = (site / "jkfac.html").read_text(encoding="utf-8")
  anchors = set(re.findall(r'\bid="([^"]+)"', page))
  for name in jkfac.__all__:
    assert name in anchors, f"jkfac.html has no entry for jkfac.{name}"
    assert f"{name}</span>" in page or f">{name}<" in page, name


def test_every_public_module_has_a_page(site):
  modules = [m.__name__ for m in build.public_modules()]
  for name in ("jkfac.transform", "jkfac.estimator", "jkfac.adaptive", "jkfac.averaging",
               "jkfac.schedules", "jkfac.distributed", "jkfac.tridiagonal", "jkfac.linalg",
               "jkfac.losses", "jkfac.tags", "jkfac.tracing", "jkfac.blocks",
               "jkfac.blocks.dense", "jkfac.blocks.conv"):
    assert name in modules
  for name in modules:
    page = site / (name.replace(".", "/") + ".html")
    assert page.is_file(), f"no page for {name}"
    assert f"{name} API documentation" in page.read_text(encoding="utf-8")
  root = (site / "jkfac.html").read_text(encoding="utf-8")
  for name in modules:
    if name.count(".") == 1:  # the package page's navigation lists every submodule
      assert f'href="jkfac/{name.split(".")[1]}.html"' in root, name
  transform = (site / "jkfac" / "transform.html").read_text(encoding="utf-8")
  assert 'id="scale_by_kfac"' in transform and "Returns" in transform


def test_pages_are_rendered_and_linked(site):
  how = (site / "how_it_works.html").read_text(encoding="utf-8")
  assert "<title>How jkfac works</title>" in how
  for heading in ("The data flow", "Conventions", "Block kinds", "Modes", "Several devices",
                  "Numbers that are not finite"):
    assert re.search(rf"<h2 id=\"[^\"]*\">{heading}</h2>", how), heading
  assert '<a href="jkfac.html#kfac"><code>jkfac.kfac(' in how  # code spans link to the reference
  assert '<a href="jkfac/tridiagonal.html"><code>jkfac.tridiagonal</code></a>' in how
  assert "<table>" in how
  index = (site / "index.html").read_text(encoding="utf-8")
  assert 'href="how_it_works.html"' in index
  for notebook in sorted((REPO_ROOT / "examples").glob("*.ipynb")):
    assert f'href="examples/{notebook.name}"' in index, notebook.name
    assert (site / "examples" / notebook.name).is_file()
  # The reference links back to the pages.
  dense = (site / "jkfac" / "blocks" / "dense.html").read_text(encoding="utf-8")
  assert 'href="../../how_it_works.html"' in dense


def test_signatures_are_readable(site):
  """Classes of other packages as they export them; no class of theirs documented as jkfac's."""
  for page in sorted(site.glob("**/*.html")):
    html = page.read_text(encoding="utf-8")
    for signature in re.findall(r'<div class="attr (?:function|class)">(.*?)</div>', html, re.S):
      text = re.sub(r"<[^>]+>", "", signature)
      for private in ("jaxlib._jax", "optax._src", "jax._src", "ForwardRef("):
        assert private not in text, (page.name, private, text)
  transform = (site / "jkfac" / "transform.html").read_text(encoding="utf-8")
  assert 'id="Array"' not in transform  # `Array = jax.Array` is a shorthand, not jkfac's class
  signature = re.sub(r"<[^>]+>", "", re.search(
      r'<section id="scale_by_kfac">.*?</section>', transform, re.S).group(0))
  assert "optax.GradientTransformationExtraArgs" in signature
  assert "Optional[jax.sharding.Mesh]" in signature


def test_public_name_spells_classes_as_their_package_exports_them():
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  assert build.public_name(jax.Array) == "jax.Array"
  assert build.public_name(optax.GradientTransformationExtraArgs) == (
      "optax.GradientTransformationExtraArgs")
  assert build.public_name(np.ndarray) is None  # already public: left as it is
  formatted = build._readable(inspect.formatannotation)(  # pylint: disable=protected-access
      Optional[dict[str, jax.Array]])
  assert formatted == "Optional[dict[str, jax.Array]]", formatted


ALIAS_MODULE = '''
"""A module made up to test how signatures with a type alias are rendered."""

from __future__ import annotations

from typing import Optional, Union

import jax
from typing_extensions import TypeAliasType

Array = jax.Array
NumberOrArray = TypeAliasType("NumberOrArray", Union[float, Array])
"""A number or an array."""


def scale(x: Array, factor: Optional[NumberOrArray] = None) -> Array:
  """Scales.

  Args:
    x: the array.
    factor: the factor.

  Returns:
    The product.
  """
  return x if factor is None else x * factor
'''


def test_type_aliases_are_shown_by_name(tmp_path, monkeypatch):
  """A `TypeAliasType` alias (what `jkfac.transform.ScalarOrSchedule` should be) keeps its name."""
  pytest.importorskip("typing_extensions")
  (tmp_path / "jkfac_fake_alias_module.py").write_text(ALIAS_MODULE, encoding="utf-8")
  monkeypatch.syspath_prepend(str(tmp_path))
  import pdoc  # pylint: disable=g-import-not-at-top
  build._configure_pdoc(pdoc)  # pylint: disable=protected-access
  with build._readable_annotations(pdoc):  # pylint: disable=protected-access
    module = pdoc.doc.Module.from_name("jkfac_fake_alias_module")
    html = pdoc.render.html_module(module, {"jkfac_fake_alias_module": module})
  text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", "", html))
  assert "factor: Optional[NumberOrArray] = None) -> jax.Array" in text, text
  assert "type NumberOrArray = Union[float, jax.Array]" in text, text
  assert 'id="Array"' not in html
  monkeypatch.delitem(sys.modules, "jkfac_fake_alias_module")


def test_without_pdoc_the_build_says_how_to_install_it(tmp_path, monkeypatch, capsys):
  monkeypatch.setitem(sys.modules, "pdoc", None)  # `import pdoc` raises ImportError
  assert build.main([str(tmp_path / "site")]) == 1
  error = capsys.readouterr().err
  assert "pdoc" in error and 'pip install -e ".[docs]"' in error, error
  assert not (tmp_path / "site").exists()


def test_a_broken_link_fails_the_site_check(site, tmp_path):
  for path in site.iterdir():
    if path.is_file():
      (tmp_path / path.name).write_bytes(path.read_bytes())
  (tmp_path / "jkfac").mkdir()
  page = tmp_path / "how_it_works.html"
  page.write_text(page.read_text(encoding="utf-8").replace(
      "</main>", '<a href="nowhere.html">x</a><a href="jkfac.html#no_such_name">y</a></main>'),
      encoding="utf-8")
  broken = build.check_links(tmp_path)
  assert any("nowhere.html" in line for line in broken), broken
  assert any("no_such_name" in line for line in broken), broken


FAKE_PACKAGE = '''
"""A package made up to test the docstring rules."""

import dataclasses
from typing import NamedTuple

__all__ = ["State", "Point", "good", "no_args", "no_returns", "wrong_args", "short",
           "nothing", "closure", "Thing", "Base", "Derived"]


class State(NamedTuple):
  """A state without an Attributes section."""
  count: int


@dataclasses.dataclass
class Point:
  """A point.

  Attributes:
    x: the abscissa.
  """
  x: float
  y: float


def good(a, *rest, **options) -> int:
  """Fine.

  Args:
    a: one.
    *rest: more.
    **options: options.

  Returns:
    A number.
  """
  return 1


def no_args(a):
  """Returns something, but says nothing of its argument."""
  return a


def no_returns(a: int) -> int:
  """Computes.

  Args:
    a: one.
  """
  def inner():
    return 2
  return a + inner()


def wrong_args(a, b) -> None:
  """Does.

  Args:
    a: one.
    c: not an argument.
  """


def short():
  """Returns 3 (no Args needed: no arguments)."""
  return 3


def nothing():
  pass


def closure(a):
  """Only its inner function returns a value.

  Args:
    a: one.
  """
  def inner():
    return a
  inner()


class Thing:
  """A thing."""

  def method(self, value):
    """Uses a value, undocumented."""
    return value

  @property
  def size(self):
    return 1

  def tree_flatten(self):
    return (), None


class Base:
  """A base class."""

  def method(self, value):
    """Uses a value.

    Args:
      value: the value.

    Returns:
      It.
    """

  def other(self, value) -> None:
    """Uses a value.

    Args:
      value: the value.
    """


class Derived(Base):
  """A subclass whose methods inherit their docstrings, which are checked."""

  def method(self, value):
    return value

  def other(self, value, extra) -> None:
    pass
'''


def test_the_rules_find_each_kind_of_problem(tmp_path, monkeypatch):
  package = tmp_path / "jkfac_fake_docs_package"
  package.mkdir()
  (package / "__init__.py").write_text(textwrap.dedent(FAKE_PACKAGE), encoding="utf-8")
  (package / "_private.py").write_text("def hidden(a):\n  return a\n", encoding="utf-8")
  (package / "sub.py").write_text("def helper(a):\n  return a\n", encoding="utf-8")
  monkeypatch.syspath_prepend(str(tmp_path))
  importlib.invalidate_caches()
  found = {p.key for p in build.check_docstrings("jkfac_fake_docs_package")}
  prefix = "jkfac_fake_docs_package."
  assert found == {prefix + key for key in (
      "State: attributes", "Point: attributes", "no_args: args", "no_returns: returns",
      "wrong_args: args-match", "nothing: doc", "Thing.method: args",
      "Thing.method: returns", "Thing.size: doc", "Derived.other: args-match", "sub: doc",
      "sub.helper: doc")}, found
  for name in [n for n in sys.modules if n.startswith("jkfac_fake_docs_package")]:
    monkeypatch.delitem(sys.modules, name)
