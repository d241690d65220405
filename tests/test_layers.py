"""Imports between the project's parts point one way, and no module imports one that imports it back.

    backend.runtime  <-  backend.annotate  <-  {backend.server, backend.prelabel}  <-  backend.__main__
          ^                     ^
          +---- model_build ----+  <-  bench (which may also use backend.server)

Every import counts: at the top of a module, inside a function (lazy) or under TYPE_CHECKING. The map is
backend/__init__.py's docstring; the README's "Development" section repeats it.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOTS = ("backend", "model_build", "bench")

# each part, and the parts it may import besides itself
MAY_USE = {
    "backend.runtime": set(),
    "backend.annotate": {"backend.runtime"},
    "backend.server": {"backend.runtime", "backend.annotate"},
    "backend.prelabel": {"backend.runtime", "backend.annotate"},
    "backend": {"backend.runtime", "backend.annotate", "backend.server", "backend.prelabel"},
    "model_build": {"backend.runtime", "backend.annotate"},
    # bench measures everything, the server included; nothing imports it
    "bench": {"backend.runtime", "backend.annotate", "backend.server", "model_build"},
}


def sources() -> dict[str, str]:
    """Module name -> source, for every Python file of the project's parts."""
    found = {}
    for root in ROOTS:
        for path in sorted((REPO / root).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path.read_text()
    return found


def part_of(module: str) -> str:
    return max((p for p in MAY_USE if module == p or module.startswith(p + ".")), key=len)


def imports(module: str, source: str, known: set[str]) -> set[str]:
    """The project modules `module` imports, anywhere in its source."""
    package = module if _is_package(module) else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            elif base.split(".")[0] not in ROOTS and f"bench.{base}" in known:
                base = f"bench.{base}"  # bench's scripts import each other as top-level modules
            # `from a.b import c` imports the module a.b.c when there is one, else a name of a.b
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        found |= {name for name in names if name in known and name != module}
    return found


def _is_package(module: str) -> bool:
    return (REPO / Path(*module.split(".")) / "__init__.py").is_file()


def graph(modules: dict[str, str]) -> dict[str, set[str]]:
    known = set(modules)
    return {name: imports(name, source, known) for name, source in modules.items()}


def crossings(edges: dict[str, set[str]]) -> list[str]:
    """Imports from a part into one it may not use."""
    bad = []
    for module, targets in sorted(edges.items()):
        mine = part_of(module)
        for target in sorted(targets):
            theirs = part_of(target)
            if theirs != mine and theirs not in MAY_USE[mine]:
                bad.append(f"{module} imports {target}: {mine} may not use {theirs}")
    return bad


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Groups of modules that import each other, directly or through others (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_tree_has_the_four_rooms():
    for room in ("runtime", "annotate", "server", "prelabel"):
        init = REPO / "backend" / room / "__init__.py"
        assert init.is_file(), f"backend/{room}/ is not a package"
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and ("May use" in doc or "Imports nothing else" in doc), f"{init}: say what it may use"
    # every module lives in a room (or is the command line / package docs at the top)
    loose = {p.name for p in (REPO / "backend").glob("*.py")}
    assert loose == {"__init__.py", "__main__.py"}, f"modules outside the rooms: {sorted(loose)}"


def test_imports_point_one_way():
    edges = graph(sources())
    assert edges["backend.server.app"] >= {"backend.annotate.predict", "backend.runtime.blip"}  # sees imports
    assert crossings(edges) == []


def test_no_module_imports_one_that_imports_it_back():
    assert cycles(graph(sources())) == []


def test_the_checks_catch_a_reversed_import():
    modules = sources()
    # the runtime reaching up into the server, lazily inside a function
    modules["backend.runtime.blip"] += "\n\ndef _x():\n    from backend.server.app import create_app\n"
    # model_build using the bulk command
    modules["model_build.report"] += "\nfrom backend.prelabel import run\n"
    assert crossings(graph(modules)) == [
        "backend.runtime.blip imports backend.server.app: backend.runtime may not use backend.server",
        "model_build.report imports backend.prelabel.run: model_build may not use backend.prelabel",
    ]


def test_the_checks_catch_a_circle():
    modules = sources()
    # images importing the module that imports it, in a block that never runs
    modules["backend.annotate.images"] += "\nif False:\n    import backend.annotate.predict\n"
    edges = graph(modules)
    assert crossings(edges) == []
    assert cycles(edges) == [["backend.annotate.images", "backend.annotate.predict"]]
