"""The package's layers: modules import only downward, with no import cycles.

The contract lives in pyproject.toml ([tool.importlinter]) and reads

  entry points (mdm_jax.main, python -m mdm_jax, mdm_jax.lm_eval)
  > cli | benchmarks > trainers > tasks > data | networks | sampling
  > diffusion | metrics | pictures > core  (> configs, plain ml_collections files)

Every import counts, including ones inside functions, and ``from P import m`` counts as
an import of the package P too (it runs and reads P's ``__init__``).  The checks are run
on small packages with a violation and cycles too, so that they are known to be able to
fail.
"""

import ast
import glob
import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

grimp = pytest.importorskip("grimp", reason="pip install -e '.[test]' (import-linter)")
from importlinter import cli as lint_cli  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Lowest first: importing a layer must not load anything above it.
LAYERS = [
    ["mdm_jax.configs"],
    ["mdm_jax.core"],
    ["mdm_jax.diffusion", "mdm_jax.metrics", "mdm_jax.pictures"],
    ["mdm_jax.data", "mdm_jax.networks", "mdm_jax.sampling"],
    ["mdm_jax.tasks"],
    ["mdm_jax.trainers"],
    ["mdm_jax.cli", "mdm_jax.benchmarks"],
    ["mdm_jax.main", "mdm_jax.eval_images", "mdm_jax.eval_gaussian", "mdm_jax.lm_eval"],
]


def _module_file(graph, module: str):
  """The source file of ``module`` (a package's ``__init__.py``), found from the root's path."""
  root = module.split(".")[0]
  top = os.path.dirname(importlib.util.find_spec(root).origin)
  rel = module.split(".")[1:]
  if module == "mdm_jax.configs" or module.startswith("mdm_jax.configs."):   # the symlinked folder
    top, rel = os.path.join(REPO, "configs"), rel[1:]
  base = os.path.join(top, *rel)
  for path in (os.path.join(base, "__init__.py"), base + ".py"):
    if os.path.isfile(path):
      return path
  return None


def namespace_imports(graph, package: str):
  """(module, P) for every ``from P import ...`` where P is a package of ``package``.

  grimp records ``from mdm_jax.data import corpora`` as an import of the module
  ``mdm_jax.data.corpora`` only; the statement also runs and reads the package
  ``mdm_jax.data`` itself, so a cycle through a package's ``__init__`` counts.
  """
  mods = set(graph.modules)
  packages = {m for m in mods if (_module_file(graph, m) or "").endswith("__init__.py")}
  edges = set()
  for m in sorted(mods):
    path = _module_file(graph, m)
    if path is None:
      continue
    for node in ast.walk(ast.parse(open(path).read())):
      if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in packages \
          and node.module != m and node.module.split(".")[0] == package.split(".")[0]:
        edges.add((m, node.module))
  return edges


def import_cycles(package: str):
  """Strongly connected components (size > 1, or a module importing itself) of the import graph.

  The graph is grimp's plus ``namespace_imports`` (``from P import m`` is an import of P).
  """
  graph = grimp.build_graph(package)
  mods = sorted(graph.modules)
  adj = {m: set(graph.find_modules_directly_imported_by(m)) & set(mods) for m in mods}
  for m, p in namespace_imports(graph, package):
    adj[m].add(p)
  adj = {m: sorted(v) for m, v in adj.items()}
  index, low, stack, on_stack, cycles = {}, {}, [], set(), []
  counter = [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on_stack.add(v)
    for w in adj[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1 or v in adj[v]:
        cycles.append(sorted(comp))

  for m in mods:
    if m not in index:
      visit(m)
  return cycles


def lint(config_path: str, cwd: str) -> int:
  old = os.getcwd()
  os.chdir(cwd)
  try:
    return lint_cli.lint_imports(config_filename=config_path, no_cache=True)
  finally:
    os.chdir(old)


def test_the_layer_contract_is_kept():
  assert lint(os.path.join(REPO, "pyproject.toml"), REPO) == lint_cli.EXIT_STATUS_SUCCESS


def test_no_import_cycles():
  assert import_cycles("mdm_jax") == []


def test_configs_import_only_configs_and_ml_collections():
  for path in glob.glob(os.path.join(REPO, "configs", "*.py")):
    tree = ast.parse(open(path).read())
    for node in ast.walk(tree):
      names = []
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.level == 0:
        names = [node.module]
      for n in names:
        assert n.split(".")[0] in ("ml_collections", "__future__", "typing", "math") \
            or n.startswith("mdm_jax.configs"), f"{os.path.basename(path)} imports {n}"


_FORK_IMPORTS = r"""
import importlib, os, sys
import jax, jax.numpy, flax.linen, optax, numpy, ml_collections, chex   # shared, not mdm_jax
layers, modules = LAYERS, MODULES
def layer_of(m):
  for i, layer in enumerate(layers):
    if any(m == p or m.startswith(p + ".") for p in layer):
      return i
  return None
bad = []
for name in modules:
  pid = os.fork()
  if pid == 0:
    try:
      importlib.import_module(name)
      own = layer_of(name)
      above = sorted(m for m in sys.modules if m.startswith("mdm_jax.") and own is not None
                     and (layer_of(m) or -1) > own)
      if above:
        print(f"{name} loads higher layers: {above}", file=sys.stderr)
        os._exit(1)
      os._exit(0)
    except BaseException as e:  # noqa: B036
      print(f"{name}: {type(e).__name__}: {e}", file=sys.stderr)
      os._exit(1)
  if os.waitpid(pid, 0)[1]:
    bad.append(name)
print("FAILED", bad)
"""


def package_modules():
  """Every module of mdm_jax, found on disk (nothing is imported to list them)."""
  root = os.path.join(REPO, "mdm_jax")
  out = []
  for d, _, files in os.walk(root):
    for f in files:
      if f.endswith(".py"):
        rel = os.path.relpath(os.path.join(d, f), REPO)[:-3].replace(os.sep, ".")
        out.append(rel[:-len(".__init__")] if rel.endswith(".__init__") else rel)
  out += ["mdm_jax.configs." + f[:-3] for f in os.listdir(os.path.join(REPO, "configs"))
          if f.endswith(".py") and f != "__init__.py"]
  return sorted(m for m in out if m != "mdm_jax.__main__")   # __main__ runs the CLI


def test_every_module_imports_on_its_own_and_loads_nothing_above_it():
  """`python -c "import mdm_jax.X"` for every module: each in a fresh forked interpreter in
  which no mdm_jax module was imported before, checking what it loaded at run time."""
  modules = package_modules()
  assert len(modules) > 80 and "mdm_jax.trainers.loop" in modules
  code = _FORK_IMPORTS.replace("LAYERS, MODULES", f"{LAYERS!r}, {modules!r}")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                       timeout=600)
  assert out.returncode == 0 and out.stdout.strip().endswith("FAILED []"), (
      out.stdout[-2000:] + out.stderr[-4000:])


def _write(root, rel, text=""):
  path = os.path.join(root, rel)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write(textwrap.dedent(text))


def test_the_checks_catch_an_upward_import_and_a_cycle(tmp_path, monkeypatch):
  root = str(tmp_path)
  _write(root, "toypkg/__init__.py")
  _write(root, "toypkg/low/__init__.py")
  _write(root, "toypkg/low/a.py", """
      def f():
        from toypkg.high import b  # an upward import, inside a function
        return b
  """)
  _write(root, "toypkg/high/__init__.py")
  _write(root, "toypkg/high/b.py", "from toypkg.low import a\n")
  _write(root, "setup.cfg", """
      [importlinter]
      root_package = toypkg

      [importlinter:contract:layers]
      name = toy layers
      type = layers
      layers =
          toypkg.high
          toypkg.low
  """)
  monkeypatch.syspath_prepend(root)
  assert lint(os.path.join(root, "setup.cfg"), root) == lint_cli.EXIT_STATUS_ERROR
  assert import_cycles("toypkg") == [["toypkg.high.b", "toypkg.low.a"]]


def test_a_cycle_through_a_package_namespace_is_caught(tmp_path, monkeypatch):
  """The shape of the cycle data/__init__ -> array_record -> (a local import) tfds_builders
  -> ``from mdm_jax.data import corpora`` had: grimp alone does not see it."""
  root = str(tmp_path)
  _write(root, "nspkg/__init__.py")
  _write(root, "nspkg/data/__init__.py", "from nspkg.data import reader\n")
  _write(root, "nspkg/data/corpora.py")
  _write(root, "nspkg/data/reader.py", """
      def open_builders():
        from nspkg.data import builders  # a local import
        return builders
  """)
  _write(root, "nspkg/data/builders/__init__.py", "from nspkg.data import corpora\n")
  monkeypatch.syspath_prepend(root)
  graph = grimp.build_graph("nspkg")
  assert not graph.find_shortest_chain("nspkg.data.builders", "nspkg.data")   # grimp: no edge
  assert namespace_imports(graph, "nspkg") == {("nspkg.data.builders", "nspkg.data"),
                                               ("nspkg.data.reader", "nspkg.data")}
  assert import_cycles("nspkg") == [["nspkg.data", "nspkg.data.builders", "nspkg.data.reader"]]
  # Importing the sibling by module path, as mdm_jax.data's modules do, removes it.
  _write(root, "nspkg/data/builders/__init__.py", "import nspkg.data.corpora as corpora\n")
  _write(root, "nspkg/data/reader.py", """
      def open_builders():
        import nspkg.data.builders as builders
        return builders
  """)
  assert import_cycles("nspkg") == []
