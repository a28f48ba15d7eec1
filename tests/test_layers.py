"""The house's layering: no module imports another that imports it back (directly or in a loop)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src"


def _imports() -> dict[str, set[str]]:
    mods = {}
    for p in (ROOT / "backdoorlab").rglob("*.py"):
        parts = p.relative_to(ROOT).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        pkg = m if p.name == "__init__.py" else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                for a in node.names:
                    hit = next((c for c in (f"{target}.{a.name}", target) if c in mods and c != m), None)
                    if hit:
                        graph[m].add(hit)
            elif isinstance(node, ast.Import):
                graph[m].update(a.name for a in node.names if a.name in mods and a.name != m)
    return graph


def test_no_import_cycles_between_modules():
    graph = _imports()
    packages = {m for m in graph if (ROOT / m.replace(".", "/") / "__init__.py").exists()}
    plain = {m: {t for t in ts if t not in packages} for m, ts in graph.items() if m not in packages}
    # depth-first search for a cycle among plain modules (package __init__ files only re-export)
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(plain.get(m, ())):
            if state.get(t) == 1:
                cycles.append(path[path.index(t):] + [t])
            elif t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(plain):
        if m not in state:
            visit(m, [m])
    assert not cycles, f"import cycles: {cycles[:3]}"
