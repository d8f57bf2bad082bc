"""The API reference: built from the docstrings with pdoc, and every cross-reference in
a docstring (``:func:`...```, ``:class:`...```, ...) names something that exists."""
import importlib
import inspect
import os
import re

import pytest

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "atod_jax")
PUBLIC = ["atod_jax.objectives", "atod_jax.models", "atod_jax.sampling", "atod_jax.envs",
          "atod_jax.rollout", "atod_jax.train", "atod_jax.data", "atod_jax.scaling"]
ROLE = re.compile(r":(func|class|mod|data|meth|attr|exc):`~?([\w.]+)`")


def _modules():
  for root, _, files in os.walk(PKG):
    for f in sorted(files):
      if f.endswith(".py"):
        rel = os.path.relpath(os.path.join(root, f), os.path.dirname(PKG))[:-3]
        yield rel.replace(os.sep, ".").removesuffix(".__init__"), os.path.join(root, f)


def _resolve(name: str, module) -> bool:
  """An absolute dotted name, or a name in the module, or a member of one of its
  classes (``:meth:`from_hf``` inside a class's docstring)."""
  parts = name.split(".")
  for i in range(len(parts), 0, -1):
    try:
      obj = importlib.import_module(".".join(parts[:i]))
    except ImportError:
      continue
    try:
      for p in parts[i:]:
        obj = getattr(obj, p)
      return True
    except AttributeError:
      break
  scopes = [module] + [c for _, c in inspect.getmembers(module, inspect.isclass)]
  for scope in scopes:
    obj = scope
    try:
      for p in parts:
        obj = getattr(obj, p)
      return True
    except AttributeError:
      continue
  return False


def test_every_docstring_reference_resolves():
  broken, seen = [], 0
  for name, path in _modules():
    module = importlib.import_module(name)
    with open(path) as f:
      for kind, target in ROLE.findall(f.read()):
        seen += 1
        if not _resolve(target, module):
          broken.append(f"{os.path.relpath(path, PKG)}: :{kind}:`{target}`")
  assert seen > 100  # the walk read the docstrings
  assert not broken, broken


def test_the_reference_checker_catches_a_broken_reference():
  from atod_jax import objectives
  assert _resolve("atod_jax.objectives.tdur_weights", objectives)
  assert _resolve("tdur_weights", objectives)
  assert not _resolve("atod_jax.objectives.no_such_function", objectives)
  assert not _resolve("no_such_function", objectives)


def test_api_reference_builds(tmp_path):
  """``pdoc -d restructuredtext -o docs/api atod_jax`` as README says: one page per
  public package, each documenting its public names."""
  pdoc = pytest.importorskip("pdoc")
  pdoc.render.configure(docformat="restructuredtext")
  pdoc.pdoc(*PUBLIC, output_directory=tmp_path)
  for name in PUBLIC:
    page = tmp_path / (name.replace(".", "/") + ".html")
    assert page.exists(), name
  objectives = (tmp_path / "atod_jax" / "objectives.html").read_text()
  for public in ("tdur_weights", "step_advantages", "clipped_policy_loss", "atod_advantages"):
    assert public in objectives


def _requirements() -> dict:
  """setup.cfg's requirements (install_requires and every extra) by package name."""
  import configparser
  from packaging.requirements import Requirement
  cfg = configparser.ConfigParser()
  cfg.read(os.path.join(os.path.dirname(PKG), "setup.cfg"))
  lines = cfg["options"]["install_requires"].splitlines()
  for extra in cfg["options.extras_require"].values():
    lines += extra.splitlines()
  reqs = {}
  for line in lines:
    line = line.split("#")[0].strip()
    if line and not line.startswith("atod_jax"):
      r = Requirement(line)
      reqs[r.name.lower().replace("_", "-")] = r
  return reqs


def test_every_requirement_is_bounded_and_the_notebook_pins_lie_inside():
  """A new major (or a 0.x minor) of a dependency cannot reach CI unasked: every
  requirement has an upper bound, and the versions the notebooks' Colab install cell
  pins satisfy setup.cfg's ranges (they were the ones CI passed with)."""
  import json
  reqs = _requirements()
  assert {"jax", "flax", "optax", "pytest", "transformers"} <= set(reqs)
  unbounded = [n for n, r in reqs.items()
               if not any(s.operator in ("<", "<=", "==", "~=") for s in r.specifier)]
  assert not unbounded, unbounded
  notebooks = os.path.join(os.path.dirname(PKG), "notebooks")
  pins = set()
  for name in sorted(os.listdir(notebooks)):
    with open(os.path.join(notebooks, name)) as f:
      cells = json.load(f)["cells"]
    for cell in cells:
      pins.update(re.findall(r'"((?:jax\[tpu\]|[a-z][\w.-]*)==[\w.]+)"', "".join(cell["source"])))
  assert len(pins) >= 5, pins  # jax, flax, optax, orbax, chex
  for pin in sorted(pins):
    name, version = pin.split("==")
    name = name.replace("[tpu]", "")
    assert reqs[name].specifier.contains(version), (pin, str(reqs[name]))


def test_xdist_groups_send_their_tests_to_one_worker(tmp_path):
  """The suite's ``xdist_group`` marks (one trainer reference run, one notebook kernel,
  one multi-process run at a time) hold with the installed pytest and pytest-xdist:
  pytest 9.2 keeps a test's id where xdist 3.8 does not write its group, and then every
  group is spread over the workers (setup.cfg bounds pytest below 9.2)."""
  import subprocess
  import sys
  (tmp_path / "test_grouped.py").write_text(
      "import os, pytest\n"
      "group = pytest.mark.xdist_group('one')\n"
      "def _log(name):\n"
      "  with open(os.path.join(os.path.dirname(__file__), 'log'), 'a') as f:\n"
      "    f.write(f\"{name} {os.environ['PYTEST_XDIST_WORKER']}\\n\")\n"
      + "".join(f"@group\ndef test_in_{i}():\n  _log('in')\n" for i in range(4))
      + "".join(f"def test_out_{i}():\n  _log('out')\n" for i in range(4)))
  proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                         "-n", "2", "--dist", "loadgroup", "-o", "addopts=", str(tmp_path)],
                        cwd=tmp_path, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  lines = (tmp_path / "log").read_text().split()
  workers = {w for name, w in zip(lines[::2], lines[1::2]) if name == "in"}
  assert len(lines) == 16 and len(workers) == 1, lines


_LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_readme_is_a_landing_page_and_every_link_resolves():
  """README stays a landing page (<= 200 lines) that links every page of docs/; every
  relative link in README, docs/*.md and configs/README.md names a file that exists."""
  root = os.path.dirname(PKG)
  readme = open(os.path.join(root, "README.md")).read()
  assert len(readme.splitlines()) <= 200
  pages = sorted(f for f in os.listdir(os.path.join(root, "docs")) if f.endswith(".md"))
  linked = {m.split("#")[0] for m in _LINK.findall(readme)}
  assert [p for p in pages if f"docs/{p}" not in linked] == []
  files = ["README.md", "configs/README.md"] + [f"docs/{p}" for p in pages]
  broken = []
  for f in files:
    for target in _LINK.findall(open(os.path.join(root, f)).read()):
      target = target.split("#")[0]
      if target and not re.match(r"^[a-z]+://", target):
        if not os.path.exists(os.path.join(root, os.path.dirname(f), target)):
          broken.append(f"{f}: {target}")
  assert broken == []
