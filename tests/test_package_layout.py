"""The package's architecture, checked from its source: no import cycles between modules, and each
subpackage imports only the subpackages its docstring's "May import ..." sentence names.

Every import statement counts, those inside functions too: a lazy import still ties two modules
together. The graph is read from the files (ast), so nothing here depends on what happens to be
importable on this machine.
"""

from __future__ import annotations

import ast
import os
import re
import textwrap

import pytest

import codegen_q

PACKAGE_DIR = os.path.dirname(os.path.abspath(codegen_q.__file__))


def module_files(root: str, package: str) -> dict[str, str]:
    """Dotted module name -> file, for every .py file under ``root`` (a package named ``package``)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if os.path.isfile(os.path.join(dirpath, d, "__init__.py")))
        rel = os.path.relpath(dirpath, root)
        parts = [package] + ([] if rel == "." else rel.split(os.sep))
        for f in sorted(filenames):
            if f.endswith(".py"):
                name = ".".join(parts if f == "__init__.py" else parts + [f[:-3]])
                out[name] = os.path.join(dirpath, f)
    return out


def import_graph(files: dict[str, str], package: str) -> dict[str, set[str]]:
    """Module -> the modules of ``package`` it imports (explicitly: ``from pkg import mod`` is an
    edge to mod, ``from pkg import name`` an edge to pkg)."""
    graph = {}
    for name, path in files.items():
        is_init = path.endswith("__init__.py")
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        edges = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: resolved against this module's package
                    base = name.split(".") if is_init else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in files else source for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in files:  # `import pkg.mod.Attr`-like forms: the longest module prefix
                    t = t.rpartition(".")[0]
                if t.split(".")[0] == package and t != name:
                    edges.add(t)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def unit_of(module: str) -> str:
    """The subpackage a module belongs to ("codegen_q" for the top-level modules)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] != "__main__" else parts[0]


def allowed_imports(files: dict[str, str], package: str) -> dict[str, set[str] | None]:
    """Subpackage -> the subpackages its docstring's "May import ..." sentence names (None: anything)."""
    out = {}
    for name, path in files.items():
        if name.count(".") != 1 or not path.endswith("__init__.py"):
            continue
        with open(path, encoding="utf-8") as f:
            doc = ast.get_docstring(ast.parse(f.read())) or ""
        m = re.search(r"May import (.*?)\.(?:\s|$)", doc, re.S)
        if m is None:
            raise AssertionError(f"{path}: the docstring does not say what the subpackage may import "
                                 f"(a sentence starting 'May import')")
        rule = " ".join(m.group(1).split())
        out[unit_of(name)] = None if rule.startswith("anything") else set(re.findall(rf"\b{package}\.(\w+)", rule))
    return out


def layering_violations(graph: dict[str, set[str]], allowed: dict[str, set[str] | None], package: str) -> list[str]:
    found = []
    for module, targets in sorted(graph.items()):
        unit = unit_of(module)
        for t in sorted(targets):
            target_unit = unit_of(t)
            if target_unit == unit:
                continue
            if target_unit == package and allowed.get(unit, ()) is not None:
                # The package's __init__ imports the library; only what may import anything may import it.
                found.append(f"{module} imports {t}: modules inside the package import submodules, not {package}")
            elif unit in allowed and allowed[unit] is not None and target_unit not in allowed[unit]:
                found.append(f"{module} imports {t}, but {package}.{unit} may import only "
                             f"{', '.join(sorted(allowed[unit])) or 'nothing else of ' + package}")
    return found


# ---------------------------------------------------------------------------------------------- the package


@pytest.fixture(scope="module")
def package():
    files = module_files(PACKAGE_DIR, "codegen_q")
    return files, import_graph(files, "codegen_q")


def test_the_walk_sees_every_subpackage_and_their_imports(package):
    files, graph = package
    assert {"codegen_q.format.weight", "codegen_q.kernels.ops", "codegen_q.model.codegen",
            "codegen_q.generation.load", "codegen_q.cli.main", "codegen_q.server.api"} <= set(files)
    # A module known to import across subpackages, at top level and inside a function:
    assert {"codegen_q.format.weight", "codegen_q.kernels.native"} <= graph["codegen_q.kernels.ops"]
    assert "codegen_q.kernels.ops" in graph["codegen_q.quantization.rtn"]  # a lazy import


def test_no_import_cycles(package):
    _, graph = package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_each_subpackage_imports_only_what_its_docstring_allows(package):
    files, graph = package
    allowed = allowed_imports(files, "codegen_q")
    assert set(allowed) == {unit_of(m) for m in files} - {"codegen_q"}, "every subpackage states its rule"
    assert layering_violations(graph, allowed, "codegen_q") == []


# ---------------------------------------------------------------------------------------------- the checker


# Two layers, "low" and "high" (which may import low), and the package's __init__.
LAYER_RULES = {"low/__init__.py": '"""May import nothing else of pkg."""\n',
               "high/__init__.py": '"""May import pkg.low."""\n'}


def checked_package(root, modules: dict[str, str]):
    """(import graph, one cycle or None, layering breaches) of a package "pkg" written under root."""
    pkg = root / "pkg"
    for rel, text in {**LAYER_RULES, **modules}.items():
        path = pkg / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    files = module_files(str(pkg), "pkg")
    graph = import_graph(files, "pkg")
    return graph, find_cycle(graph), layering_violations(graph, allowed_imports(files, "pkg"), "pkg")


def test_the_checker_finds_a_lazy_cycle_and_a_layering_breach(tmp_path):
    graph, cycle, breaches = checked_package(tmp_path, {
        "__init__.py": "from pkg.low.a import f\n",
        "low/a.py": "def f():\n    from pkg.high import b\n    return b\n",
        "high/b.py": "from pkg.low import a\nimport pkg\n",
    })
    assert graph["pkg.low.a"] == {"pkg.high.b"} and graph["pkg.high.b"] == {"pkg.low.a", "pkg"}
    assert cycle is not None and cycle[0] == cycle[-1] and {"pkg.low.a", "pkg.high.b"} <= set(cycle)
    assert any(b.startswith("pkg.low.a imports pkg.high.b") for b in breaches)
    assert any(b.startswith("pkg.high.b imports pkg:") for b in breaches)
    assert not any(b.startswith("pkg.high.b imports pkg.low") for b in breaches)


def test_the_checker_passes_a_layered_package(tmp_path):
    graph, cycle, breaches = checked_package(tmp_path, {
        "__init__.py": "from pkg.high.b import g\n",
        "low/a.py": "def f():\n    return 1\n",
        "high/b.py": "from pkg.low.a import f\nfrom . import c\n\ndef g():\n    return f()\n",
        "high/c.py": "",
    })
    assert graph["pkg.high.b"] == {"pkg.low.a", "pkg.high.c"}
    assert cycle is None and breaches == []
