"""The project's import graph, read with ``ast`` (nothing is imported): no cycle among the project's modules,
no private name (``_x``) imported from another project module, and readers (``ckpt_bridge/formats/*``) import
no writer, planner or command module, so data and imports flow one way (issue 16).  The folders themselves are
in one order (issue 28 item 5, :data:`FOLDER_ORDER`): a folder imports only the folders before it.

Every ``import`` statement counts, at module level and inside functions: an in-function import still makes the
importing module depend on the imported one, it only hides the cycle until the function runs. Each failing test
lists all its findings (file:line and what was imported), not only the first one.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# On-disk folder -> the package it installs as (pyproject.toml [tool.setuptools.package-dir]).
PACKAGE_DIRS = {
    "ckpt_bridge": ROOT / "ckpt_bridge",
    "ckpt_bridge.integrations": ROOT / "integrations",
    "ckpt_bridge.patches": ROOT / "patches",
}

# Packages a reader must not import: the writers (sinks), the planners, the model builders and the commands that
# drive them. A reader lists and reads tensors; the code that plans, builds, writes or orchestrates sits
# downstream of it, so data and imports flow one way (formats -> plan -> pipeline -> writers -> commands).
READER_PACKAGE = "ckpt_bridge.formats"
NOT_FOR_READERS = (
    "ckpt_bridge.writers",
    "ckpt_bridge.commands",
    "ckpt_bridge.checks",
    "ckpt_bridge.plan",
    "ckpt_bridge.models",
    "ckpt_bridge.cli",
    "ckpt_bridge.demo",
)


# The order of the folders (issue 28): a module imports only modules of its own place or of the places before
# it.  The leaves are the shared one-file helpers (ckpt_bridge/<name>.py) that import nothing of ours but
# other leaves; a package (ckpt_bridge/<folder>/) takes its folder's place; the last place is what drives
# everything (checks, the CLI, the public API in __init__, the demo, the test harness, the integrations).
# A new top-level module must be given its place here.
FOLDER_ORDER: list[tuple[str, tuple[str, ...]]] = [
    ("leaves", ("errors", "safeload", "confine", "jsonfiles", "dtypes", "compare", "progress", "quiet",
                "cyclic_gc", "version", "options", "meshes")),
    ("formats", ("formats",)),
    ("models", ("models",)),
    ("plan", ("plan",)),
    ("pipeline", ("pipeline",)),
    ("writers", ("writers",)),
    ("commands", ("commands", "summary")),
    ("checks / cli", ("checks", "cli", "__main__", "__init__", "demo", "testing", "integrations", "patches")),
]


def _modules() -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package ``__init__``), for every project module."""
    found = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            parts = list(rel.parts)
            is_init = parts[-1] == "__init__"
            if is_init:
                parts = parts[:-1]
            name = ".".join([package, *parts]) if parts else package
            found[name] = (path, is_init)
    return found


MODULES = _modules()


def _resolve(module: str, is_init: bool, level: int, target: str | None) -> str:
    """The absolute name of ``from <level dots><target> import ...`` written in ``module``."""
    if level == 0:
        return target or ""
    base = module.split(".") if is_init else module.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _project(name: str) -> str | None:
    """The project module ``name`` refers to (the longest known prefix), or None when it is not ours."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


class _Edge:
    __slots__ = ("src", "dst", "line", "names", "in_function")

    def __init__(self, src, dst, line, names, in_function):
        self.src, self.dst, self.line, self.names, self.in_function = src, dst, line, names, in_function

    def where(self) -> str:
        path = MODULES[self.src][0].relative_to(ROOT)
        return f"{path}:{self.line}"


def _edges() -> list[_Edge]:
    edges = []
    for module, (path, is_init) in MODULES.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        functions = {
            id(node)
            for fn in ast.walk(tree)
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            for node in ast.walk(fn)
        }
        for node in ast.walk(tree):
            in_function = id(node) in functions
            if isinstance(node, ast.Import):
                for alias in node.names:
                    dst = _project(alias.name)
                    if dst and dst != module:
                        edges.append(_Edge(module, dst, node.lineno, [], in_function))
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(module, is_init, node.level, node.module)
                for alias in node.names:
                    # ``from pkg import sub`` imports the sub-module pkg.sub when there is one; otherwise a name.
                    sub = f"{base}.{alias.name}"
                    if sub in MODULES:
                        dst, names = sub, []
                    else:
                        dst, names = _project(base), [alias.name]
                    if dst and dst != module:
                        edges.append(_Edge(module, dst, node.lineno, names, in_function))
    # One edge per import statement and target module, with all the names it takes.
    merged: dict[tuple, _Edge] = {}
    for e in edges:
        key = (e.src, e.dst, e.line)
        if key in merged:
            merged[key].names += e.names
        else:
            merged[key] = e
    return list(merged.values())


EDGES = _edges()


def _cycles() -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as a list of modules."""
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for e in EDGES:
        graph[e.src].add(e.dst)
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_is_read():
    """The walk finds the project: the CLI, a reader and the integrations, and the edges between them."""
    assert {"ckpt_bridge.cli", "ckpt_bridge.formats.dcp", "ckpt_bridge.integrations.torchtitan"} <= set(MODULES)
    assert any(e.src == "ckpt_bridge.cli" for e in EDGES)
    # ``from . import x`` inside a package resolves to the sibling module, not to the package.
    assert _resolve("ckpt_bridge.formats.dcp", False, 1, None) == "ckpt_bridge.formats"
    assert _resolve("ckpt_bridge.formats", True, 1, "base") == "ckpt_bridge.formats.base"
    assert _resolve("ckpt_bridge.formats.dcp", False, 2, "errors") == "ckpt_bridge.errors"


def test_no_import_cycle():
    cycles = _cycles()
    lines = []
    for comp in cycles:
        members = set(comp)
        lines.append(f"cycle of {len(comp)} modules: {', '.join(comp)}")
        for e in EDGES:
            if e.src in members and e.dst in members:
                kind = "in function" if e.in_function else "top level"
                lines.append(f"    {e.where()}: {e.src} -> {e.dst} ({kind})")
    assert not cycles, "import cycles among project modules:\n" + "\n".join(lines)


def test_no_private_name_imported_across_modules():
    found = [
        f"{e.where()}: {e.src} imports {name} from {e.dst}"
        for e in EDGES
        for name in e.names
        if name.startswith("_") and not name.startswith("__")
    ]
    assert not found, f"{len(found)} private names imported across modules:\n" + "\n".join(found)


def test_readers_import_no_writer_planner_or_command():
    def banned(dst):
        return any(dst == b or dst.startswith(b + ".") for b in NOT_FOR_READERS)

    found = [
        f"{e.where()}: {e.src} -> {e.dst}"
        for e in EDGES
        if (e.src == READER_PACKAGE or e.src.startswith(READER_PACKAGE + ".")) and banned(e.dst)
    ]
    assert not found, "readers importing writers, planners or commands:\n" + "\n".join(found)


def _place(module: str) -> tuple[int, str] | None:
    """(index in FOLDER_ORDER, its name) of a project module, None if FOLDER_ORDER gives it no place."""
    parts = module.split(".")
    first = parts[1] if len(parts) > 1 else "__init__"
    for i, (name, members) in enumerate(FOLDER_ORDER):
        if first in members:
            return i, name
    return None


def test_every_module_has_a_place_in_the_folder_order():
    missing = sorted(m for m in MODULES if _place(m) is None)
    assert not missing, ("modules FOLDER_ORDER gives no place (add the new top-level module or folder to it, "
                         "in the place that matches what it imports):\n" + "\n".join(missing))


def test_folders_import_only_folders_before_them():
    """leaves <- formats <- models <- plan <- pipeline <- writers <- commands <- checks / cli: every import
    statement (module level and in functions) goes to the module's own place or one before it."""
    found, pairs = [], set()
    for e in EDGES:
        src, dst = _place(e.src), _place(e.dst)
        if src is not None and dst is not None and dst[0] > src[0]:
            kind = "in function" if e.in_function else "top level"
            found.append(f"{e.where()}: {e.src} ({src[1]}) -> {e.dst} ({dst[1]}) ({kind})")
            pairs.add(f"{src[1]} -> {dst[1]}")
    assert not found, (f"{len(found)} imports against the folder order ({' <- '.join(n for n, _ in FOLDER_ORDER)}); "
                       f"folders: {', '.join(sorted(pairs))}:\n" + "\n".join(found))


def _top_level_names(path: Path) -> set[str]:
    """Names a module binds at its top level (in if/try blocks too, not inside functions or classes)."""
    names: set[str] = set()

    def visit(body):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names.update((a.asname or a.name).split(".")[0] for a in node.names)
            elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    names.update(n.id for n in ast.walk(t) if isinstance(n, ast.Name))
            elif isinstance(node, (ast.If, ast.Try, ast.With, ast.For, ast.While)):
                for field in ("body", "orelse", "finalbody"):
                    visit(getattr(node, field, []))
                for h in getattr(node, "handlers", []):
                    visit(h.body)

    visit(ast.parse(path.read_text()).body)
    return names


def test_every_name_imported_from_a_project_module_exists():
    """A moved helper leaves no caller importing it from its old home (an in-function import fails only when
    its function runs, e.g. in a torchrun worker)."""
    bound = {m: _top_level_names(path) for m, (path, _) in MODULES.items()}
    found = [f"{e.where()}: {e.dst} has no {name}" for e in EDGES for name in e.names
             if name != "*" and name not in bound[e.dst]]
    assert not found, "names imported from a project module that does not define them:\n" + "\n".join(found)


if __name__ == "__main__":  # a quick report: python tests/test_import_graph.py
    inner = {(e.src, e.line) for e in EDGES if e.in_function}
    print(f"{len(MODULES)} modules, {len(EDGES)} import edges, {len(inner)} in-function import statements")
    for test in (test_no_import_cycle, test_no_private_name_imported_across_modules,
                 test_readers_import_no_writer_planner_or_command, test_every_name_imported_from_a_project_module_exists,
                 test_every_module_has_a_place_in_the_folder_order, test_folders_import_only_folders_before_them):
        try:
            test()
            print(f"{test.__name__}: ok")
        except AssertionError as exc:
            print(f"{test.__name__}: {exc}")
