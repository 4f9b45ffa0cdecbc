"""The README's quickstart runs as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_quickstart_runs(capsys):
  code = re.findall(r"## Quickstart\n\n```python\n(.*?)```", README.read_text(), re.S)
  assert code, "README.md has no Quickstart python block"
  namespace = {}
  exec(compile(code[0], str(README), "exec"), namespace)  # pylint: disable=exec-used
  out = capsys.readouterr().out
  assert "Dense_0" in out and "loss" in out
  assert float(namespace["loss"]) < 1.0
