"""The package's shape, checked from its source: which module imports which.

No module imports one that imports it back (directly or through others);
pyfuse3 is imported only by the FUSE adapter and its vault side, the mount and
the benchmark's floor; the dispatcher, a pure state machine, reaches neither
trio nor pyfuse3, whatever it imports.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "outheisfs"
PYFUSE3_ALLOWED = {"ops", "vaultops", "mount", "bench.floor", "bench.passthrough"}


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name below it ("bench" for a package)."""
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = list(path.relative_to(PKG).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts and parts != ["__main__"]:
            out[".".join(parts)] = path
    return out


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports(name: str, path: Path, runtime_only: bool = False) -> set[str]:
    """What module `name` imports: package modules by dotted name, others by
    their top-level name. With runtime_only, `if TYPE_CHECKING:` blocks are left out."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    if runtime_only:
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and _type_checking(node):
                skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    known = modules()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                mod = node.module or ""
                if mod == "outheisfs" or mod.startswith("outheisfs."):
                    base = mod.removeprefix("outheisfs").lstrip(".")
                    out.update(_resolve(base, [a.name for a in node.names], known))
                else:
                    out.add(mod.split(".")[0])
                continue
            base_parts = package.split(".") if package else []
            if node.level > 1:
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
            base = ".".join([*base_parts, *([node.module] if node.module else [])])
            out.update(_resolve(base, [a.name for a in node.names], known))
    out.discard(name)
    return out


def _resolve(base: str, names: list[str], known: dict[str, Path]) -> set[str]:
    """`from BASE import NAMES`: the package modules that names."""
    out = set()
    for n in names:
        full = f"{base}.{n}" if base else n
        if full in known:
            out.add(full)
        elif base in known:
            out.add(base)
    return out


def graph(runtime_only: bool = False) -> dict[str, set[str]]:
    known = modules()
    return {
        name: {m for m in imports(name, path, runtime_only) if m in known}
        for name, path in known.items()
    }


def test_no_module_imports_one_that_imports_it_back() -> None:
    g = graph()
    state: dict[str, int] = {}  # 1: on the path, 2: done
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(g[node]):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for start in sorted(g):
        if start not in state:
            visit(start, [start])
    assert cycles == []


def test_only_the_adapter_the_vault_the_mount_and_the_floor_import_pyfuse3() -> None:
    users = {name for name, path in modules().items() if "pyfuse3" in imports(name, path)}
    assert users == PYFUSE3_ALLOWED


def test_the_dispatcher_reaches_neither_trio_nor_pyfuse3() -> None:
    known = modules()
    g = graph(runtime_only=True)
    seen, todo = set(), ["dispatcher"]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo.extend(g[m])
    outside = set().union(*(imports(m, known[m], runtime_only=True) for m in seen))
    assert not {"trio", "pyfuse3"} & outside, sorted(seen)


def test_the_check_sees_imports() -> None:
    """The checks above would see a violation: ops imports pyfuse3 and access."""
    assert {"pyfuse3", "access", "openfile"} <= imports("ops", modules()["ops"])
    assert "eventlog" not in graph(runtime_only=True)["dispatcher"]
    assert "eventlog" in graph()["dispatcher"]


# -- the module map of docs/design.md -------------------------------------------------

DESIGN = PKG.parent / "docs" / "design.md"


def module_map() -> list[str]:
    """The modules of the map's table in docs/design.md, top to bottom."""
    text = DESIGN.read_text()
    section = text[text.index("## 1. Module map") : text.index("## 2. ")]
    return re.findall(r"^\| `([a-z_.]+)` \|", section, re.MULTILINE)


def test_the_module_map_lists_every_module_and_only_those() -> None:
    listed = module_map()
    assert len(listed) == len(set(listed)), "listed twice"
    assert set(listed) == set(modules())


def test_each_module_imports_only_modules_below_it_in_the_map() -> None:
    """bench stands apart: it may use the runtime, and only cli reaches it."""
    order = {name: i for i, name in enumerate(module_map())}
    upward = []
    for name, deps in graph().items():
        for dep in deps:
            if name.startswith("bench") and not dep.startswith("bench"):
                continue
            if dep.startswith("bench") and not name.startswith("bench"):
                if name != "cli":
                    upward.append(f"{name} -> {dep}")
                continue
            if order[dep] <= order[name]:
                upward.append(f"{name} -> {dep}")
    assert upward == []
