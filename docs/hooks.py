# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""mkdocs hook: an API reference page per public module of jkfac.

Each page is mkdocstrings' `::: module` (the docstrings, Google style); a
module is public when no part of its dotted name starts with `_`.
"""

from __future__ import annotations

import ast
import pathlib

from mkdocs.structure.files import File, Files

SRC = pathlib.Path(__file__).resolve().parents[1] / "src"


def public_modules() -> list[str]:
  """The dotted names of jkfac's public modules, the package first.

  Returns:
    `["jkfac", "jkfac.accumulation", ...]`.
  """
  names = []
  for path in sorted((SRC / "jkfac").rglob("*.py")):
    parts = path.relative_to(SRC).with_suffix("").parts
    parts = parts[:-1] if parts[-1] == "__init__" else parts
    if not any(part.startswith("_") for part in parts):
      names.append(".".join(parts))
  return sorted(names, key=lambda name: (name != "jkfac", name))


def _page(name: str) -> str:
  """A reference page's Markdown: the module's docstrings.

  The package's page also shows, by their defining module, the public
  functions named like a module (`jkfac.estimator`, `jkfac.diagnostics`),
  which the package's attribute of that name would otherwise hide.

  Args:
    name: the module's dotted name.

  Returns:
    The page's Markdown.
  """
  text = f"# `{name}`\n\n::: {name}\n"
  if name == "jkfac":
    tree = ast.parse((SRC / "jkfac" / "__init__.py").read_text())
    exported = next(ast.literal_eval(node.value) for node in tree.body
                    if isinstance(node, ast.Assign)
                    and getattr(node.targets[0], "id", None) == "__all__")
    for attr in exported:
      if (SRC / "jkfac" / f"{attr}.py").is_file():
        text += f"\n::: jkfac.{attr}.{attr}\n    options:\n      show_root_heading: true\n"
  return text


def on_config(config):
  """Lists the reference pages in the navigation (mkdocs' `on_config` event).

  Args:
    config: the mkdocs configuration.

  Returns:
    `config`, its `nav` ending with "API reference" and one entry per module.
  """
  config["nav"].append({"API reference": [{name: f"reference/{name}.md"}
                                          for name in public_modules()]})
  return config


def on_files(files: Files, config) -> Files:
  """Adds the reference pages to the site's files (mkdocs' `on_files` event).

  Args:
    files: the site's files.
    config: the mkdocs configuration.

  Returns:
    `files` with `reference/<module>.md` for each public module.
  """
  for name in public_modules():
    files.append(File.generated(config, f"reference/{name}.md",
                                content=_page(name)))
  return files
