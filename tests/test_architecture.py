"""The package's shape: no import cycles, short functions in the trainer, every
registered environment and method complete."""
import ast
import os
import sys

import pytest

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "atod_jax")


def _modules() -> dict[str, str]:
  """Module name -> file, for every module of the package."""
  out = {}
  for root, _, files in os.walk(PKG):
    for f in files:
      if f.endswith(".py"):
        rel = os.path.relpath(os.path.join(root, f), os.path.dirname(PKG))[:-3]
        name = rel.replace(os.sep, ".")
        out[name[:-len(".__init__")] if name.endswith(".__init__") else name] = os.path.join(root, f)
  return out


def _imports(name: str, path: str, known: set[str]) -> set[str]:
  """The package modules ``name`` imports (anywhere in the file: a function-level import
  is still an edge), resolved to modules (``from a import b`` is ``a.b`` when that is a
  module, else ``a``)."""
  with open(path) as f:
    tree = ast.parse(f.read())
  package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parent = package.split(".")
        base = ".".join(parent[:len(parent) - node.level + 1] + ([base] if base else []))
      targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
    else:
      continue
    out.update(t for t in targets if t in known and t != name)
  return out


def test_no_import_cycle():
  """Data flows one way: walking every import of every module finds no cycle."""
  mods = _modules()
  graph = {m: _imports(m, p, set(mods)) for m, p in mods.items()}

  def parents(m):  # importing a.b.c runs a/__init__ and a/b/__init__ first
    parts = m.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))} & set(mods)

  for m in graph:
    graph[m] = {t for t in graph[m] if t not in parents(m)}
  state: dict[str, int] = {}
  stack: list[str] = []

  def visit(m):
    state[m] = 1
    stack.append(m)
    for t in sorted(graph[m]):
      if state.get(t) == 1:
        cycle = stack[stack.index(t):] + [t]
        pytest.fail("import cycle: " + " -> ".join(cycle))
      if t not in state:
        visit(t)
    stack.pop()
    state[m] = 2

  for m in sorted(graph):
    if m not in state:
      visit(m)
  assert "atod_jax.train.loop" in graph and graph["atod_jax.train.loop"]  # the walk saw edges


def test_the_cycle_check_finds_a_cycle(tmp_path, monkeypatch):
  """The walker above would see a cycle: two modules importing each other."""
  pkg = tmp_path / "atod_jax"
  pkg.mkdir()
  (pkg / "__init__.py").write_text("")
  (pkg / "a.py").write_text("from atod_jax import b\n")
  (pkg / "b.py").write_text("def f():\n  from atod_jax.a import x\n")
  monkeypatch.setattr(sys.modules[__name__], "PKG", str(pkg))
  with pytest.raises(pytest.fail.Exception, match="import cycle"):
    test_no_import_cycle()


@pytest.mark.parametrize("part", ["train", "rollout", "envs", "scaling"])
def test_functions_are_short(part):
  """No function of the trainer, the rollouts, the environments or the scaling tools
  runs over 60 lines (docstring included)."""
  long = []
  for root, _, files in os.walk(os.path.join(PKG, part)):
    for f in files:
      if not f.endswith(".py"):
        continue
      path = os.path.join(root, f)
      with open(path) as fh:
        tree = ast.parse(fh.read())
      for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
          n = node.end_lineno - node.lineno + 1
          if n > 60:
            long.append(f"{os.path.relpath(path, PKG)}:{node.lineno} {node.name} ({n} lines)")
  assert not long, long


def test_every_registered_environment_resolves():
  """Each registry entry names a constructor that exists and a format to prompt with."""
  from atod_jax.envs import registry
  for kind, entry in registry.ENVS.items():
    fn = registry.resolve(entry.device or entry.factory)
    assert callable(fn), kind
    assert entry.agent.system and entry.agent.instructions, kind
    assert (entry.requires is None) == (entry.extra is None), kind


def test_every_method_is_documented_and_coherent():
  from atod_jax.train.methods import METHODS
  for name, m in METHODS.items():
    assert m.doc and m.update in ("policy", "supervised"), name
    if m.update == "supervised":
      assert not m.uses_teacher and not m.needs_groups, name
