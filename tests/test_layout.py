"""The house's shape, read from the package's imports as text (module level and inside functions alike): no
import circle among fastlocal's files, and no file of the package imports a command-line front end."""

import ast
from pathlib import Path

import fastlocal

PACKAGE = Path(fastlocal.__file__).parent
FRONT_ENDS = {
    "fastlocal.train",
    "fastlocal.plan",
    "fastlocal.analyze",
    "fastlocal.export",
    "fastlocal.evaluate",
    "fastlocal.sweep",
    "fastlocal.report",
}


def module_files(root: Path) -> dict[str, Path]:
    files = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the package's modules it imports; a module's own parent packages are left out (Python imports
    them before the module anyway, so they cannot close a circle that matters)."""
    files = module_files(root)

    def owner(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    kept = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(kept + ([base] if base else []))
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            for name in names:
                target = owner(name)
                if target and target != module and not module.startswith(target + "."):
                    targets.add(target)
        graph[module] = targets
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (a path from each to each)."""

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    reachable = {m: reach(m) for m in graph}
    found = {frozenset({m} | {n for n in reachable[m] if m in reachable[n]}) for m in graph}
    return sorted(sorted(c) for c in found if len(c) > 1)


def test_the_package_has_no_import_circle():
    assert circles(import_graph(PACKAGE)) == []


def test_no_file_of_the_package_imports_a_command_line_front_end():
    graph = import_graph(PACKAGE)
    offenders = {m: sorted(graph[m] & FRONT_ENDS) for m in graph if graph[m] & FRONT_ENDS}
    assert offenders == {}


def test_the_checks_find_a_circle_and_a_front_end_import(tmp_path):
    """The two checks on a package written to fail both: a.py <-> b.py, and c.py importing the CLI."""
    root = tmp_path / "fastlocal"
    root.mkdir()
    (root / "__init__.py").write_text("")
    (root / "a.py").write_text("from fastlocal.b import f\n")
    (root / "b.py").write_text("def f():\n    from fastlocal import a\n")
    (root / "c.py").write_text("from . import train\n")
    (root / "train.py").write_text("")
    graph = import_graph(root)
    assert circles(graph) == [["fastlocal.a", "fastlocal.b"]]
    assert graph["fastlocal.c"] & FRONT_ENDS == {"fastlocal.train"}
