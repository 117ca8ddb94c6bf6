"""The package's import structure: layers, no cycles, no cross-module private names.

Everything is read with :mod:`ast` (nothing is imported), so the check is fast and cannot be
fooled by import-time side effects. Three rules, each violation reported as one line
``module -> imported (reason)``:

1. **Layers.** A module may import simu_jax modules of its own layer or a lower one only
   (:data:`LAYERS`; docs/architecture.md shows the same table). Module-level and
   function-level imports both count. ``from simu_jax import curvature`` imports the
   submodule ``simu_jax.curvature`` when that file or directory exists, else the package
   ``__init__``; ``from simu_jax.data import X`` (X not a submodule) imports
   ``simu_jax.data``; ``import simu_jax.data.tofu`` imports ``simu_jax.data.tofu`` only.
   A module that matches no entry of the table is itself a violation.
2. **No cycles** in the graph of those imports (all of them, module- and function-level).
3. **No cross-module private names**: ``from simu_jax.x import _y`` or ``alias._y`` where
   ``alias`` names an imported simu_jax module (``S._put`` after
   ``from simu_jax import sharding as S``); dunders (``__version__``) are fine. Checked in
   the package and in ``experiments/*.py`` and ``tools/*.py``.

Run ``python tests/test_architecture.py`` for the list of violations of the current tree.
"""

from __future__ import annotations

import ast
import dataclasses
import re
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "simu_jax"

# Layer of every module, low to high: the longest matching prefix (whole dotted components)
# decides, so "simu_jax.evaluate.report" is 11 while the rest of "simu_jax.evaluate" is 8.
# The root package's own entry ("simu_jax": its __init__) matches only itself, never as a
# prefix: a new top-level module has to be added here. docs/architecture.md shows the same
# table (test_docs_table_matches keeps the two in step).
LAYERS: dict[str, int] = {
    # 0 base
    "simu_jax.base": 0,
    "simu_jax.config": 0,
    "simu_jax.runio": 0,
    "simu_jax.checkpoint": 0,
    "simu_jax.host_memory": 0,
    # 1 data
    "simu_jax.data": 1,
    # 2 models
    "simu_jax.models": 2,
    # 3 objective
    "simu_jax.losses": 3,
    "simu_jax.selection": 3,
    # 4 analysis
    "simu_jax.attribution": 4,
    "simu_jax.curvature": 4,
    # 5 optim
    "simu_jax.optim": 5,
    # 6 sharding
    "simu_jax.sharding": 6,
    # 7 engine
    "simu_jax.engine": 7,
    "simu_jax.train_step": 7,
    # 8 evaluate (all but report)
    "simu_jax.evaluate": 8,
    "simu_jax.memory": 8,
    # 9 loop
    "simu_jax.loop": 9,
    # 10 pipelines
    "simu_jax.finetune": 10,
    "simu_jax.unlearn": 10,
    # 11 top
    "simu_jax.evaluate.report": 11,
    "simu_jax.demo": 11,
    "simu_jax.planted": 11,
    "simu_jax.bench": 11,
    "simu_jax.cli": 11,
    "simu_jax": 11,
}

LAYER_NAMES = ["base", "data", "models", "objective", "analysis", "optim", "sharding", "engine", "evaluate",
               "loop", "pipelines", "top"]

OUTSIDE_DIRS = ("experiments", "tools")  # rule 3 only: *.py directly in these folders


# ----------------------------------------------------------------------------
# The checker
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Import:
    """One resolved import: ``module`` imports ``target`` (a module, or the ``<package>`` root)."""

    module: str
    target: str
    line: int
    names: tuple[str, ...] = ()  # the names taken with `from target import ...` (not submodules)


def discover(pkg_dir: Path, package: str, clashes: list[str] | None = None) -> dict[str, tuple[Path, bool]]:
    """Every module of the package: dotted name -> (file, is_package). A name that is both a
    file ``x.py`` and a package ``x/`` is appended to ``clashes`` (the package wins, as in
    Python's import system, and the file is dead code)."""
    modules: dict[str, tuple[Path, bool]] = {}
    for path in sorted(pkg_dir.rglob("*.py")):
        rel = path.relative_to(pkg_dir).with_suffix("")
        parts = [package, *rel.parts]
        if "__pycache__" in parts:
            continue
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        name = ".".join(parts)
        if name in modules:
            if clashes is not None:
                clashes.append(f"{name} -> {name} (both a module file and a package: remove one)")
            if not is_pkg:
                continue
        modules[name] = (path, is_pkg)
    return modules


def layer_of(module: str, layers: Mapping[str, int], package: str) -> int | None:
    """The layer of ``module`` by longest matching prefix; None when no entry matches."""
    best, best_len = None, -1
    for key, layer in layers.items():
        prefix_ok = key != package and module.startswith(key + ".")
        if (module == key or prefix_ok) and len(key) > best_len:
            best, best_len = layer, len(key)
    return best


def _base_package(module: str, is_pkg: bool, level: int) -> str:
    """The package a relative import of ``level`` dots in ``module`` starts from."""
    parts = module.split(".")
    if not is_pkg:
        parts = parts[:-1]
    if level > 1:
        parts = parts[: len(parts) - (level - 1)]
    return ".".join(parts)


def _module_aliases(tree: ast.AST, resolve_from) -> dict[str, str]:
    """Local names bound to package modules anywhere in the file: name -> dotted module.

    ``import a.b`` binds ``a`` (to the root package); ``import a.b as x`` binds ``x`` to
    ``a.b``; ``from a import b [as x]`` binds ``b`` / ``x`` when ``a.b`` is a module.
    Scopes are not told apart (a module alias is rarely rebound to something else).
    """
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname:
                    aliases[a.asname] = a.name
                else:
                    aliases[a.name.split(".")[0]] = a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            base = resolve_from(node)
            if base is None:
                continue
            for a in node.names:
                aliases[a.asname or a.name] = f"{base}.{a.name}"
    return aliases


def _dotted(node: ast.AST) -> str | None:
    """``a.b.c`` for a chain of Name / Attribute nodes, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(node.id)
    return ".".join(reversed(parts))


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _parent_of(child: str, parent: str) -> bool:
    return child == parent or child.startswith(parent + ".")


def scan_file(path: Path, module: str, is_pkg: bool, modules: Mapping[str, object], package: str,
              ) -> tuple[list[Import], list[str], list[str]]:
    """Parse one file: (its resolved imports of package modules, private-name violations,
    unresolvable imports). ``module`` names the file for messages (outside the package:
    its path, and relative imports are not resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    in_package = _parent_of(module, package)
    imports: list[Import] = []
    private: list[str] = []
    broken: list[str] = []

    def known(name: str) -> bool:
        return name in modules

    def from_base(node: ast.ImportFrom) -> str | None:
        """The absolute module of ``from X import ...``, None when it is not in the package."""
        if node.level:
            if not in_package:
                return None
            base = _base_package(module, is_pkg, node.level)
            name = f"{base}.{node.module}" if node.module else base
        else:
            name = node.module or ""
        return name if _parent_of(name, package) else None

    def add(target: str, line: int, names: tuple[str, ...] = ()):
        if not known(target):
            broken.append(f"{module} -> {target} (no such module, line {line})")
            return
        imports.append(Import(module, target, line, names))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if _parent_of(a.name, package):
                    add(a.name, node.lineno)
                    for part in a.name.split(".")[1:]:
                        if _private(part):
                            private.append(f"{module} -> {a.name} (private module, line {node.lineno})")
        elif isinstance(node, ast.ImportFrom):
            base = from_base(node)
            if base is None:
                continue
            plain: list[str] = []
            for a in node.names:
                sub = f"{base}.{a.name}"
                if a.name != "*" and known(sub):
                    add(sub, node.lineno)
                    if _private(a.name) and not _parent_of(module, base):
                        private.append(f"{module} -> {sub} (private module, line {node.lineno})")
                else:
                    plain.append(a.name)
                    if _private(a.name) and module != base:
                        private.append(f"{module} -> {base}.{a.name} (private name, line {node.lineno})")
            if plain:
                add(base, node.lineno, tuple(plain))

    # alias._name where alias (or alias.sub...) is a package module
    aliases = _module_aliases(tree, from_base)
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and _private(node.attr)):
            continue
        chain = _dotted(node.value)
        if chain is None:
            continue
        head, _, rest = chain.partition(".")
        if head not in aliases:
            continue
        target = aliases[head] + (f".{rest}" if rest else "")
        if _parent_of(target, package) and known(target) and target != module:
            private.append(f"{module} -> {target}.{node.attr} (private attribute, line {node.lineno})")
    return imports, private, broken


def find_cycles(edges: Mapping[str, set[str]]) -> list[list[str]]:
    """Cycles of a directed graph: one shortest cycle through each node of every strongly
    connected component not yet on an earlier cycle of that component (so every module in a
    cycle appears in at least one reported path). Each path starts and ends at the same node."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    sccs: list[list[str]] = []
    counter = [0]

    def strongconnect(v: str):  # Tarjan, recursive (the graphs are small)
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                strongconnect(w)
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
            sccs.append(sorted(comp))

    for v in sorted(set(edges) | {w for ws in edges.values() for w in ws}):
        if v not in index:
            strongconnect(v)

    cycles: list[list[str]] = []
    for comp in sorted(sccs):
        members = set(comp)
        if len(comp) == 1 and comp[0] not in edges.get(comp[0], ()):
            continue
        covered: set[str] = set()
        for start in comp:
            if start in covered:
                continue
            # BFS inside the component for the shortest path start -> ... -> start
            prev: dict[str, str] = {}
            frontier, seen, found = [start], {start}, None
            while frontier and found is None:
                nxt = []
                for v in frontier:
                    for w in sorted(edges.get(v, ())):
                        if w == start:
                            found = v
                            break
                        if w in members and w not in seen:
                            seen.add(w)
                            prev[w] = v
                            nxt.append(w)
                    if found is not None:
                        break
                frontier = nxt
            path = [start]
            v = found
            while v is not None and v != start:
                path.append(v)
                v = prev.get(v)
            path = [start, *reversed(path[1:]), start]
            covered.update(path)
            cycles.append(path)
    return cycles


def check(root: Path, package: str = PACKAGE, layers: Mapping[str, int] = LAYERS,
          outside_dirs: Iterable[str] = OUTSIDE_DIRS) -> list[str]:
    """All violations of the three rules for ``root/package`` (and rule 3 for
    ``root/<outside_dirs>/*.py``), sorted within each rule."""
    layer_v, private_v, broken_v = [], [], []
    modules = discover(root / package, package, layer_v)
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for module, (path, is_pkg) in modules.items():
        imports, private, broken = scan_file(path, module, is_pkg, modules, package)
        private_v += private
        broken_v += broken
        mine = layer_of(module, layers, package)
        if mine is None:
            layer_v.append(f"{module} -> {module} (matches no layer: add it to the layer table)")
        for imp in imports:
            if imp.target != module:
                edges[module].add(imp.target)
            theirs = layer_of(imp.target, layers, package)
            if mine is not None and theirs is not None and theirs > mine:
                names = f" {', '.join(imp.names)}" if imp.names else ""
                layer_v.append(f"{module} -> {imp.target} (upward: layer {mine} {_lname(mine)} imports layer "
                               f"{theirs} {_lname(theirs)}{names}, line {imp.line})")
    for folder in outside_dirs:
        for path in sorted((root / folder).glob("*.py")):
            _, private, _ = scan_file(path, f"{folder}/{path.name}", False, modules, package)
            private_v += private
    cycle_v = [f"{' -> '.join(c)} (cycle)" for c in find_cycles(edges)]
    return sorted(set(layer_v)) + cycle_v + sorted(set(private_v)) + sorted(set(broken_v))


def _lname(layer: int) -> str:
    return f"({LAYER_NAMES[layer]})" if 0 <= layer < len(LAYER_NAMES) else ""


def _report(violations: list[str]) -> str:
    return f"{len(violations)} architecture violation(s):\n  " + "\n  ".join(violations)


# ----------------------------------------------------------------------------
# The real tree
# ----------------------------------------------------------------------------


def test_package_architecture():
    violations = check(ROOT)
    assert not violations, _report(violations)


def test_docs_table_matches():
    """docs/architecture.md's layer table lists the same modules at the same layers as LAYERS.

    Rows look like ``| 3 | objective | `simu_jax.losses`, `simu_jax.selection` | ... |``."""
    doc = ROOT / "docs" / "architecture.md"
    if not doc.is_file():
        pytest.fail("docs/architecture.md is missing (it shows the layer table)")
    table: dict[str, int] = {}
    for line in doc.read_text(encoding="utf-8").splitlines():
        m = re.match(r"\|\s*(\d+)\s*\|[^|]*\|([^|]*)\|", line)
        if m:
            for name in re.findall(r"`(simu_jax[\w.]*)`", m.group(2)):
                table[name] = int(m.group(1))
    assert table == LAYERS, (
        f"docs/architecture.md vs LAYERS: only in the doc {sorted(set(table) - set(LAYERS))}, only in the test "
        f"{sorted(set(LAYERS) - set(table))}, different layers "
        f"{sorted(k for k in set(table) & set(LAYERS) if table[k] != LAYERS[k])}")


# ----------------------------------------------------------------------------
# The checker on planted trees
# ----------------------------------------------------------------------------

FAKE_LAYERS = {"pkg.low": 0, "pkg.mid": 1, "pkg.sub": 1, "pkg.high": 2, "pkg": 2}


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


CLEAN = {
    "pkg/__init__.py": "from pkg.high import run\n__version__ = '1'\n",
    "pkg/low.py": "import os\nCONST = 1\ndef _helper():\n    return 2\n",
    "pkg/mid.py": "from pkg.low import CONST\nfrom pkg import low as L\nx = L.CONST\n",
    "pkg/sub/__init__.py": "from pkg.sub import a\nfrom . import b\n",
    "pkg/sub/a.py": "from pkg.sub.b import f\nfrom ..low import CONST\n",
    "pkg/sub/b.py": "import pkg.low\ndef f():\n    return pkg.low.CONST\n",
    "pkg/high.py": "def run():\n    from pkg import mid, sub\n    import pkg.low\n    return pkg.low.__name__\n",
    "experiments/e.py": "from pkg.high import run\nfrom pkg import low\nlow.CONST\n",
}


def _check_fake(tmp_path, extra=None, layers=FAKE_LAYERS):
    files = {**CLEAN, **(extra or {})}
    return check(_write(tmp_path, files), package="pkg", layers=layers, outside_dirs=("experiments", "tools"))


def test_checker_clean_tree(tmp_path):
    assert _check_fake(tmp_path) == []


def test_checker_upward_import_in_function(tmp_path):
    v = _check_fake(tmp_path, {"pkg/low.py": "def f():\n    from pkg.high import run\n    return run\n"})
    assert "pkg.low -> pkg.high (upward: layer 0 (base) imports layer 2 (models) run, line 2)" in v
    assert "pkg.high -> pkg.low -> pkg.high (cycle)" in v  # high imports low, so this closes a cycle
    assert all("upward" in x or "cycle" in x for x in v), v


def test_checker_package_init_and_submodule_resolution(tmp_path):
    # `from pkg import run` is the root __init__ (layer 2); `from pkg import low` the submodule.
    v = _check_fake(tmp_path, {"pkg/mid.py": "from pkg import low, run\n"})
    assert v == ["pkg.mid -> pkg (upward: layer 1 (data) imports layer 2 (models) run, line 1)",
                 "pkg -> pkg.high -> pkg.mid -> pkg (cycle)"]


def test_checker_cycle(tmp_path):
    v = _check_fake(tmp_path, {"pkg/low.py": "import os\nCONST = 1\ndef g():\n    from pkg.mid import x\n",
                               "pkg/mid.py": "from pkg.low import CONST\nx = 1\n"})
    assert "pkg.low -> pkg.mid (upward: layer 0 (base) imports layer 1 (data) x, line 4)" in v
    assert "pkg.low -> pkg.mid -> pkg.low (cycle)" in v
    assert len(v) == 2


def test_checker_cycle_through_package_init(tmp_path):
    # a submodule taking a name from its own package's __init__, which imports it back
    v = _check_fake(tmp_path, {"pkg/sub/b.py": "from pkg.sub import helper\ndef f():\n    pass\n"})
    assert v == ["pkg.sub -> pkg.sub.b -> pkg.sub (cycle)", "pkg.sub.a -> pkg.sub.b -> pkg.sub -> pkg.sub.a (cycle)"]
    v = _check_fake(tmp_path, {"pkg/sub/b.py": "from . import f2\ndef f():\n    pass\n",
                               "pkg/sub/__init__.py": "from pkg.sub.b import f\nf2 = f\n",
                               "pkg/sub/a.py": "x = 1\n"})
    assert v == ["pkg.sub -> pkg.sub.b -> pkg.sub (cycle)"]


def test_checker_private_names(tmp_path):
    v = _check_fake(tmp_path, {
        "pkg/mid.py": "from pkg.low import _helper, CONST\n",
        "pkg/high.py": "from pkg import low as L\nimport pkg.sub.b\ndef run():\n    return L._helper(), pkg.sub.b._x\n",
        "tools/t.py": "import pkg.low\npkg.low._helper()\n",
    })
    assert v == [
        "pkg.high -> pkg.low._helper (private attribute, line 4)",
        "pkg.high -> pkg.sub.b._x (private attribute, line 4)",
        "pkg.mid -> pkg.low._helper (private name, line 1)",
        "tools/t.py -> pkg.low._helper (private attribute, line 2)",
    ]


def test_checker_unknown_and_unlisted_modules(tmp_path):
    v = _check_fake(tmp_path, {"pkg/extra.py": "from pkg.gone import x\n"})
    assert v == ["pkg.extra -> pkg.extra (matches no layer: add it to the layer table)",
                 "pkg.extra -> pkg.gone (no such module, line 1)"]


def test_checker_module_and_package_clash(tmp_path):
    v = _check_fake(tmp_path, {"pkg/sub.py": "x = 1\n"})
    assert v == ["pkg.sub -> pkg.sub (both a module file and a package: remove one)"]


def test_layer_lookup_longest_prefix():
    assert layer_of("simu_jax.evaluate.report", LAYERS, PACKAGE) == 11
    assert layer_of("simu_jax.evaluate.runner", LAYERS, PACKAGE) == 8
    assert layer_of("simu_jax.evaluate", LAYERS, PACKAGE) == 8
    assert layer_of("simu_jax.sharding.mesh", LAYERS, PACKAGE) == 6
    assert layer_of("simu_jax", LAYERS, PACKAGE) == 11
    assert layer_of("simu_jax.newthing", LAYERS, PACKAGE) is None  # the root entry is no prefix
    assert layer_of("simu_jax.database", LAYERS, PACKAGE) is None  # whole components only


if __name__ == "__main__":
    found = check(ROOT)
    print(_report(found) if found else "no architecture violations")
    sys.exit(1 if found else 0)
