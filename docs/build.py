# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""Builds the jkfac documentation: the API reference and the pages.

    python docs/build.py [OUTPUT_DIR]

writes a static HTML site into OUTPUT_DIR (default `docs/_build`). It needs
pdoc (`pip install -e ".[docs]"`; the `test` extra has it too), and says so
when it is missing. The site holds:

- the API reference of every public module of the `jkfac` package, made by
  pdoc from the docstrings (Google style): `jkfac.html` (the public names of
  `jkfac.__all__`), `jkfac/transform.html`, `jkfac/blocks/dense.html`, ...;
- the pages, Markdown files of `docs/` rendered with pdoc's Markdown
  renderer into pdoc's page frame: `index.html` (from `docs/index.md`) and
  `how_it_works.html` (from `docs/how_it_works.md`). In their HTML, a code
  span naming a public object (`jkfac.kfac`, `jkfac.blocks.conv`) becomes a
  link to its reference, a link to another page (`how_it_works.md`) to its
  HTML, and a link to a notebook (`../examples/quickstart.ipynb`) to the
  copy of it put in the site's `examples/`.

The build fails (an exception; exit status 1 from the command line) when

1. a docstring breaks a rule of `check_docstrings`;
2. pdoc warns while it renders the reference;
3. a page links to a file that is not in the site, or to an anchor that is
   not on the page it links to;
4. a notebook of `examples/` is not linked from `docs/index.md`;
5. `jkfac.html` does not document every name of `jkfac.__all__`.

Signatures are made readable while the reference renders
(`_readable_annotations`): classes of other packages are spelled as those
packages export them (`jax.Array`, not `jax.jaxlib._jax.Array`), and type
aliases made with `typing_extensions.TypeAliasType` keep their names
(`damping: ScalarOrSchedule`); the module pages do not document classes of
other packages bound to module-level names (`Array = jax.Array`).

The docstring rules (`check_docstrings`) apply to every module of the
package whose dotted name has no part starting with `_`, and in each to its
public objects: the names of its `__all__` when it has one, else the
functions and classes it defines whose names do not start with `_`, and the
methods and properties those classes define whose names do not start with `_`
(`__call__` included; `__init__`, whose arguments the class docstring
describes, and the pytree protocol's `tree_flatten`/`tree_unflatten`, not).
A method without a docstring of its own is checked with the one it inherits
from a base class (`inspect.getdoc`), which is also the one pdoc shows.
Every problem has a rule name:

- `doc`: every module, function, class, method and property has a docstring;
- `args`: a function or method that takes arguments (besides `self`/`cls`)
  has an `Args:` section;
- `args-match`: that section describes every argument (`name:`, `*args:`,
  `**kwargs:`; arguments named `unused...` may be left out) and nothing that
  is not an argument;
- `returns`: a function or method that returns a value (a `return` with a
  value, or a `yield`, in its own body, unless annotated `-> None`) has a
  `Returns:` (or `Yields:`) section, unless its docstring begins with
  "Returns" or "Yields" (Google style's one-line form);
- `attributes`: a NamedTuple or dataclass has an `Attributes:` section
  that describes every one of its fields (state classes are NamedTuples).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import importlib
import inspect
import pathlib
import pkgutil
import re
import shutil
import sys
import textwrap
import types
import typing
import warnings
from typing import Any, Iterable, Iterator, Optional, Sequence

DOCS_DIR = pathlib.Path(__file__).resolve().parent
REPO_ROOT = DOCS_DIR.parent
EXAMPLES_DIR = REPO_ROOT / "examples"
TEMPLATES_DIR = DOCS_DIR / "templates"
DEFAULT_OUTPUT = DOCS_DIR / "_build"
PACKAGE = "jkfac"

# (Markdown source in docs/, output file, title), in navigation order.
PAGES = (
    ("index.md", "index.html", "jkfac"),
    ("how_it_works.md", "how_it_works.html", "How jkfac works"),
)
RULES = ("doc", "args", "args-match", "returns", "attributes")
SHOW_SOURCE = True  # a "View Source" button under every object
_EXEMPT_METHODS = frozenset({"tree_flatten", "tree_unflatten"})
_SECTION = re.compile(r"^([A-Z][A-Za-z ]*):\s*$")
_ENTRY = re.compile(r"^\s*(\*{0,2}[A-Za-z_]\w*)\s*(\([^)]*\))?\s*:")
# A code span naming a public object, or calling it: `jkfac.kfac`, `jkfac.kfac(est, ...)`.
_CODE_NAME = re.compile(rf"<code>({PACKAGE}(?:\.\w+)*)(?:\([^<]*\))?</code>")


class DocsError(Exception):
  """The documentation did not build, or broke one of its checks."""


@dataclasses.dataclass(frozen=True, order=True)
class Problem:
  """A docstring that breaks a rule.

  Attributes:
    name: the object's dotted name (`jkfac.linalg.floored_shift`).
    rule: one of `RULES`.
    detail: what is missing, for people.
  """
  name: str
  rule: str
  detail: str = dataclasses.field(default="", compare=False)

  @property
  def key(self) -> str:
    """The object and the rule it breaks: `name: rule`."""
    return f"{self.name}: {self.rule}"

  def __str__(self) -> str:
    return f"{self.key} ({self.detail})" if self.detail else self.key


# --- the docstring check -------------------------------------------------------


def public_modules(package: str = PACKAGE) -> list[types.ModuleType]:
  """Imports the package and every public module in it.

  Args:
    package: the top-level package name.

  Returns:
    The modules, the package first, then by name; a module is public when
    no part of its dotted name starts with `_`.
  """
  root = importlib.import_module(package)
  modules = [root]
  for info in sorted(pkgutil.walk_packages(root.__path__, package + "."),
                     key=lambda info: info.name):
    if not any(part.startswith("_") for part in info.name.split(".")):
      modules.append(importlib.import_module(info.name))
  return modules


def _sections(doc: str) -> dict[str, list[str]]:
  """The Google-style sections of a docstring: title -> its lines."""
  sections: dict[str, list[str]] = {}
  current = None
  for line in doc.splitlines():
    match = _SECTION.match(line)
    if match:
      current = match.group(1)
      sections[current] = []
    elif current is not None:
      if line.strip() and not line.startswith((" ", "\t")):
        current = None  # unindented prose ends the section
      else:
        sections[current].append(line)
  return sections


def _described(lines: Sequence[str]) -> set[str]:
  """The names a section describes (its least indented `name:` entries)."""
  entries = [line for line in lines if line.strip()]
  if not entries:
    return set()
  indent = min(len(line) - len(line.lstrip()) for line in entries)
  names = set()
  for line in entries:
    match = _ENTRY.match(line)
    if match and len(line) - len(line.lstrip()) == indent:
      names.add(match.group(1).lstrip("*"))
  return names


def _returns_value(function: Any) -> bool:
  """Whether `function`'s own body returns a value or yields."""
  annotation = getattr(function, "__annotations__", {}).get("return", inspect.Signature.empty)
  if annotation is None or annotation == "None":
    return False
  try:
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
  except (OSError, TypeError, SyntaxError):
    return annotation is not inspect.Signature.empty
  top = tree.body[0]
  pending, found = list(ast.iter_child_nodes(top)), False
  while pending and not found:
    node = pending.pop()
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
      continue  # a nested function's returns are its own
    if isinstance(node, (ast.Yield, ast.YieldFrom)):
      found = True
    elif isinstance(node, ast.Return) and node.value is not None:
      found = not (isinstance(node.value, ast.Constant) and node.value.value is None)
    pending.extend(ast.iter_child_nodes(node))
  return found


def _check_function(name: str, function: Any, doc: Optional[str]) -> list[Problem]:
  """The problems of a function's or method's docstring."""
  if not doc:
    return [Problem(name, "doc", "no docstring")]
  problems = []
  sections = _sections(doc)
  try:
    parameters = [p for p in inspect.signature(function).parameters.values()
                  if p.name not in ("self", "cls")]
  except (TypeError, ValueError):
    parameters = []
  if parameters and "Args" not in sections:
    problems.append(Problem(name, "args",
                            "no Args: section for " + ", ".join(p.name for p in parameters)))
  elif parameters:
    described = _described(sections["Args"])
    missing = [p.name for p in parameters
               if p.name not in described and not p.name.startswith("unused")]
    extra = sorted(described - {p.name for p in parameters})
    if missing or extra:
      detail = "; ".join(part for part in (
          "not described: " + ", ".join(missing) if missing else "",
          "not arguments: " + ", ".join(extra) if extra else "") if part)
      problems.append(Problem(name, "args-match", detail))
  first_word = doc.split(maxsplit=1)[0].strip("`") if doc.split() else ""
  if (_returns_value(function) and not {"Returns", "Yields"} & sections.keys()
      and first_word not in ("Returns", "Yields")):
    problems.append(Problem(name, "returns", "no Returns: section"))
  return problems


def _fields(cls: type) -> Optional[list[str]]:
  """The fields of a NamedTuple or dataclass, else None."""
  if issubclass(cls, tuple) and hasattr(cls, "_fields"):
    return list(cls._fields)
  if dataclasses.is_dataclass(cls):
    return [f.name for f in dataclasses.fields(cls)]
  return None


def _check_class(name: str, cls: type) -> list[Problem]:
  """The problems of a class's docstring and of its methods' and properties'."""
  problems = []
  doc = cls.__dict__.get("__doc__")
  fields = _fields(cls)
  if not doc:
    problems.append(Problem(name, "doc", "no docstring"))
  elif fields:
    sections = _sections(inspect.cleandoc(doc))
    if "Attributes" not in sections:
      problems.append(Problem(name, "attributes",
                              "no Attributes: section for " + ", ".join(fields)))
    else:
      missing = [f for f in fields if f not in _described(sections["Attributes"])]
      if missing:
        problems.append(Problem(name, "attributes", "not described: " + ", ".join(missing)))
  for attr, value in cls.__dict__.items():
    if (attr.startswith("_") and attr != "__call__") or attr in _EXEMPT_METHODS:
      continue
    if isinstance(value, (staticmethod, classmethod)):
      value = value.__func__
    if isinstance(value, property):
      if not (value.__doc__ or "").strip():
        problems.append(Problem(f"{name}.{attr}", "doc", "no docstring"))
    elif inspect.isfunction(value):
      problems += _check_function(f"{name}.{attr}", value, inspect.getdoc(value))
  return problems


def _public_objects(module: types.ModuleType) -> list[tuple[str, Any]]:
  """A module's public objects, as `(name, object)` (see the module docstring)."""
  if hasattr(module, "__all__"):
    return [(name, getattr(module, name)) for name in module.__all__]
  return [(name, value) for name, value in vars(module).items()
          if not name.startswith("_") and (inspect.isfunction(value) or inspect.isclass(value))
          and getattr(value, "__module__", None) == module.__name__]


def check_docstrings(package: str = PACKAGE) -> list[Problem]:
  """Checks the docstrings of a package's public API against the rules.

  Args:
    package: the top-level package name.

  Returns:
    The problems, sorted; each object is checked once, under the name of
    the first module (in `public_modules` order) that makes it public.
  """
  problems: list[Problem] = []
  seen: set[int] = set()
  for module in public_modules(package):
    if not (module.__doc__ or "").strip():
      problems.append(Problem(module.__name__, "doc", "no module docstring"))
    for short, value in _public_objects(module):
      name = f"{module.__name__}.{short}"
      if not (inspect.isfunction(value) or inspect.isclass(value)):
        if module.__name__ == package and not inspect.ismodule(value):
          if not (getattr(value, "__doc__", None) or "").strip():
            problems.append(Problem(name, "doc", "no docstring"))
        continue
      if id(value) in seen:
        continue
      seen.add(id(value))
      if inspect.isclass(value):
        problems += _check_class(name, value)
      else:
        problems += _check_function(name, value, inspect.getdoc(value))
  return sorted(set(problems))


# --- rendering ----------------------------------------------------------------


PDOC_MISSING = ("the documentation is built with pdoc, which is not installed here. Install the "
                "docs extra from the repository's root:  pip install -e \".[docs]\"")


def _import_pdoc() -> Any:
  """pdoc, imported; a `DocsError` naming the install command if it is missing."""
  try:
    import pdoc  # pylint: disable=g-import-not-at-top
    import pdoc.render  # pylint: disable=g-import-not-at-top,unused-import
    import pdoc.render_helpers  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as error:
    raise DocsError(f"{PDOC_MISSING}\n({type(error).__name__}: {error})") from error
  return pdoc


def _type_alias_types() -> tuple[type, ...]:
  """The classes of `TypeAliasType` objects: `typing`'s (3.12+) and `typing_extensions`'s."""
  kinds = [getattr(typing, "TypeAliasType", None)]
  try:
    import typing_extensions  # pylint: disable=g-import-not-at-top
    kinds.append(getattr(typing_extensions, "TypeAliasType", None))
  except ImportError:
    pass
  return tuple(dict.fromkeys(kind for kind in kinds if isinstance(kind, type)))


def _classes_in(annotation: Any) -> Iterator[type]:
  """The classes an annotation names, at any depth (`Optional[dict[str, jax.Array]]`)."""
  if isinstance(annotation, (list, tuple)):  # the argument list of a `Callable`
    for item in annotation:
      yield from _classes_in(item)
    return
  if isinstance(annotation, type) and not typing.get_args(annotation):
    yield annotation
  if isinstance(annotation, _type_alias_types()):
    return  # shown by its name
  for argument in typing.get_args(annotation):
    yield from _classes_in(argument)


def public_name(cls: type) -> Optional[str]:
  """How the documentation spells a class of another package whose home is private.

  Args:
    cls: the class (`jax.Array`, whose `__module__` and `__qualname__` read
      `jax.jaxlib._jax.Array`; `optax.GradientTransformationExtraArgs`,
      defined in `optax._src.base`).

  Returns:
    The shortest `package.Name`, `package.module.Name` or
    `package.module.module.Name` (modules already imported, no part starting
    with `_`) that exports the class under its own name: `jax.Array`,
    `optax.GradientTransformationExtraArgs`, `jax.sharding.Mesh`,
    `jax.extend.core.Jaxpr`. None when its own spelling is already public,
    or no public one is found.
  """
  module = getattr(cls, "__module__", None) or ""
  spelled = f"{module}.{getattr(cls, '__qualname__', '')}"
  if not any(part.startswith("_") for part in spelled.split(".")):
    return None
  top, name = module.split(".")[0], cls.__qualname__.rsplit(".", 1)[-1]
  if getattr(sys.modules.get(top), name, None) is cls:
    return f"{top}.{name}"
  candidates = sorted((module_name.count("."), module_name) for module_name in list(sys.modules)
                      if module_name.split(".")[0] == top and module_name.count(".") <= 2
                      and not any(part.startswith("_") for part in module_name.split(".")))
  for _, module_name in candidates:
    if getattr(sys.modules[module_name], name, None) is cls:
      return f"{module_name}.{name}"
  return None


def _readable(original: Any) -> Any:
  """`inspect.formatannotation`, with other packages' classes spelled as they export them."""
  def formatannotation(annotation: Any, *args: Any, **kwargs: Any) -> str:
    if isinstance(annotation, typing.ForwardRef):  # not evaluated: its text is what was written
      return annotation.__forward_arg__
    text = original(annotation, *args, **kwargs)
    for cls in set(_classes_in(annotation)):
      public = public_name(cls)
      if public:
        text = re.sub(rf"\b{re.escape(cls.__module__ + '.' + cls.__qualname__)}\b", public, text)
    return text
  return formatannotation


@contextlib.contextmanager
def _readable_annotations(pdoc: Any) -> Iterator[None]:
  """While the reference is rendered, make its signatures readable.

  pdoc evaluates every annotation and prints what it finds, so without help
  `jax.Array` reads `jax.jaxlib._jax.Array`, optax's transforms
  `optax._src.base.GradientTransformationExtraArgs`, and a type alias is
  printed expanded. Here, (1) a class whose own module path is private is
  spelled as its package exports it (`public_name`), (2) an annotation pdoc
  could not evaluate is shown as written, not as `ForwardRef('...')`, and
  (3) aliases made with `typing_extensions.TypeAliasType` (the Python 3.12
  `type` statement's object, which pdoc shows by name in signatures) are
  documented as type aliases on every Python, not only on 3.12+. This
  replaces `formatannotation` in `inspect` (which formats the parameters)
  and in `pdoc.doc`, and pdoc's `TypeAliasType`, and restores them after.

  Args:
    pdoc: the pdoc module.

  Yields:
    Nothing: the reference is rendered inside the `with` block.
  """
  doc = pdoc.doc
  saved = (inspect.formatannotation, getattr(doc, "formatannotation", inspect.formatannotation),
           getattr(doc, "TypeAliasType", None))
  inspect.formatannotation = _readable(saved[0])
  doc.formatannotation = _readable(saved[1])
  doc.TypeAliasType = _type_alias_types() or saved[2]
  try:
    yield
  finally:
    inspect.formatannotation, doc.formatannotation, doc.TypeAliasType = saved


def _configure_pdoc(pdoc: Any) -> None:
  pdoc.render.configure(docformat="google", template_directory=TEMPLATES_DIR,
                        footer_text=f"{PACKAGE} documentation", search=True,
                        show_source=SHOW_SOURCE)
  pdoc.render.env.globals["jkfac_pages"] = [(out, title) for _, out, title in PAGES]


def render_reference(output: pathlib.Path) -> list[str]:
  """Renders the API reference with pdoc into `output`.

  Args:
    output: the site folder.

  Returns:
    The names of the modules rendered.

  Raises:
    DocsError: pdoc warned while rendering.
  """
  pdoc = _import_pdoc()
  _configure_pdoc(pdoc)
  modules = [m.__name__ for m in public_modules()]  # imported before warnings are recorded
  with warnings.catch_warnings(record=True) as caught, _readable_annotations(pdoc):
    warnings.simplefilter("always")
    # What pdoc.pdoc does, for exactly these modules (pdoc's own walk of the
    # package would skip the submodules that jkfac.__all__ does not name).
    documented = {name: pdoc.doc.Module.from_name(name) for name in modules}
    for name, module in documented.items():
      page = output / (name.replace(".", "/") + ".html")
      page.parent.mkdir(parents=True, exist_ok=True)
      page.write_text(pdoc.render.html_module(module, documented), encoding="utf-8")
    search = pdoc.render.search_index(documented)
    if search:
      (output / "search.js").write_text(search, encoding="utf-8")
  relevant = [w for w in caught if not _ignored_warning(w)]
  if relevant:
    raise DocsError("pdoc warned while rendering the API reference:\n" + "\n".join(
        f"  {w.category.__name__}: {w.message}" for w in relevant))
  return modules


def _resolve(name: str) -> Any:
  """The object a dotted name refers to, or None."""
  parts = name.split(".")
  for cut in range(len(parts), 0, -1):
    module = sys.modules.get(".".join(parts[:cut]))
    if module is not None:
      value: Any = module
      for attr in parts[cut:]:
        value = getattr(value, attr, None)
      return value
  return None


def _ignored_warning(warning: warnings.WarningMessage) -> bool:
  """Warnings that do not make the reference wrong.

  Deprecations (of whatever imports them), and pdoc failing to evaluate the
  annotations of a NamedTuple's generated constructor under
  `from __future__ import annotations` (its namespace is not the module's;
  the fields' annotations are shown from the class itself).
  """
  if issubclass(warning.category, (DeprecationWarning, PendingDeprecationWarning,
                                   FutureWarning)):
    return True
  match = re.match(r"Error parsing type annotation .* for (\S+)\.__init__\. ",
                   str(warning.message), flags=re.S)
  if match:
    cls = _resolve(match.group(1))
    return inspect.isclass(cls) and issubclass(cls, tuple) and hasattr(cls, "_fields")
  return False


def _api_target(name: str, modules: Sequence[str]) -> Optional[str]:
  """The site-relative URL of a public object's reference, or None.

  The name is resolved attribute by attribute from the package, as Python
  would (`jkfac.estimator` is the function, which the package exports, not
  the module of the same name); the page is the last module on the way.
  """
  parts = name.split(".")
  if parts[0] not in modules or any(part.startswith("_") for part in parts):
    return None
  value: Any = sys.modules[parts[0]]
  page, anchor = parts[0], []
  for part in parts[1:]:
    if not hasattr(value, part):
      return None
    value = getattr(value, part)
    if inspect.ismodule(value):
      if value.__name__ not in modules:
        return None
      page, anchor = value.__name__, []
    else:
      anchor.append(part)
  url = page.replace(".", "/") + ".html"
  return url + "#" + ".".join(anchor) if anchor else url


def _rewrite_links(body: str, modules: Sequence[str], notebooks: set[str]) -> str:
  """Links code spans to the reference; `.md` pages and notebooks to the site's."""
  def code(match: re.Match) -> str:  # `jkfac.kfac`, or a call `jkfac.kfac(est, ...)`
    target = _api_target(match.group(1), modules)
    return match.group(0) if target is None else f'<a href="{target}">{match.group(0)}</a>'

  def href(match: re.Match) -> str:
    url = match.group(1)
    page = re.fullmatch(r"([\w-]+)\.md(#[\w-]*)?", url)
    if page:
      return f'href="{page.group(1)}.html{page.group(2) or ""}"'
    notebook = re.fullmatch(r"\.\./examples/([\w-]+\.ipynb)", url)
    if notebook and notebook.group(1) in notebooks:
      return f'href="examples/{notebook.group(1)}"'
    return match.group(0)

  body = re.sub(r'href="([^"]*)"', href, body)
  # Code spans outside links and code blocks: pdoc's renderer writes them as <code>x</code>.
  pieces = re.split(r"(<a\b.*?</a>|<pre\b.*?</pre>)", body, flags=re.S)
  return "".join(piece if i % 2 else re.sub(_CODE_NAME, code, piece)
                 for i, piece in enumerate(pieces))


def render_pages(output: pathlib.Path, modules: Sequence[str]) -> None:
  """Renders the Markdown pages of `docs/` and copies the notebooks.

  Args:
    output: the site folder (the reference already rendered into it).
    modules: the modules of the reference, for links.
  """
  pdoc = _import_pdoc()
  render_helpers = pdoc.render_helpers
  _configure_pdoc(pdoc)
  notebooks = {path.name for path in EXAMPLES_DIR.glob("*.ipynb")}
  (output / "examples").mkdir(parents=True, exist_ok=True)
  for name in sorted(notebooks):
    shutil.copyfile(EXAMPLES_DIR / name, output / "examples" / name)
  template = pdoc.render.env.get_template("page.html.jinja2")
  for source, target, title in PAGES:
    converted = render_helpers.to_html((DOCS_DIR / source).read_text(encoding="utf-8"))
    toc = getattr(converted, "toc_html", "") or ""
    body = _rewrite_links(str(converted), modules, notebooks)
    page = template.render(title=title, content=body, toc=toc, current=target)
    (output / target).write_text(page, encoding="utf-8")


# --- the site's checks ------------------------------------------------------------


def _anchors(path: pathlib.Path) -> set[str]:
  return set(re.findall(r'\bid="([^"]+)"', path.read_text(encoding="utf-8")))


def check_links(output: pathlib.Path) -> list[str]:
  """Local links of the pages that lead nowhere.

  Args:
    output: the site folder.

  Returns:
    One line per broken link.
  """
  broken = []
  for _, target, _ in PAGES:
    page = output / target
    for url in re.findall(r'href="([^"]*)"', page.read_text(encoding="utf-8")):
      if re.match(r"^[a-z][a-z0-9+.-]*:", url) or url.startswith("//"):
        continue  # another site
      path, _, anchor = url.partition("#")
      linked = (output / path).resolve() if path else page
      if not linked.is_file():
        broken.append(f"{target}: link to {url!r}: no such file in the site")
      elif anchor and linked.suffix == ".html" and anchor not in _anchors(linked):
        broken.append(f"{target}: link to {url!r}: no such anchor")
  return broken


def check_site(output: pathlib.Path) -> list[str]:
  """The site's completeness checks (rules 3-5 of the module docstring).

  Args:
    output: the site folder.

  Returns:
    One line per failure.
  """
  failures = check_links(output)
  index = (DOCS_DIR / "index.md").read_text(encoding="utf-8")
  for path in sorted(EXAMPLES_DIR.glob("*.ipynb")):
    if f"../examples/{path.name}" not in index:
      failures.append(f"docs/index.md does not link to the notebook examples/{path.name}")
  package = importlib.import_module(PACKAGE)
  anchors = _anchors(output / f"{PACKAGE}.html")
  for name in package.__all__:
    if name not in anchors:
      failures.append(f"{PACKAGE}.html does not document {PACKAGE}.{name}")
  return failures


def build(output: pathlib.Path = DEFAULT_OUTPUT) -> pathlib.Path:
  """Checks the docstrings, then renders and checks the site.

  Args:
    output: the site folder (created if needed; files in it are overwritten).

  Returns:
    The path of the site's `index.html`.

  Raises:
    DocsError: pdoc is not installed (the message says how to install it),
      or a check failed (the message lists every failure).
  """
  _import_pdoc()  # before the slower checks: a missing pdoc is said at once
  problems = check_docstrings()
  if problems:
    raise DocsError(f"{len(problems)} docstring problem(s):\n  " + "\n  ".join(
        f"{p}  [rule {p.rule!r}; see docs/build.py]" for p in problems))
  output = pathlib.Path(output)
  output.mkdir(parents=True, exist_ok=True)
  modules = render_reference(output)
  render_pages(output, modules)
  failures = check_site(output)
  if failures:
    raise DocsError("the site is incomplete:\n  " + "\n  ".join(failures))
  return output / "index.html"


def main(argv: Optional[Iterable[str]] = None) -> int:
  """The command line: `python docs/build.py [OUTPUT_DIR]`.

  Args:
    argv: the arguments (default: `sys.argv[1:]`).

  Returns:
    The exit status: 0 when the site was built, 1 when a check failed.
  """
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("output", nargs="?", type=pathlib.Path, default=DEFAULT_OUTPUT,
                      help="the site folder (default: docs/_build)")
  args = parser.parse_args(None if argv is None else list(argv))
  try:
    index = build(args.output)
  except DocsError as error:
    print(f"docs/build.py: {error}", file=sys.stderr)
    return 1
  print(f"built {index}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
