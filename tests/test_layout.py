"""The house rules of the code base, read from the source with ``ast`` (docs/ARCHITECTURE.md):
no import circle; drivers/ imports nothing of agent/ or ctl/; agent/ never imports ctl/; the
core imports no feature package; no module over 600 lines. Lazy imports inside functions count
like the others: a circle that only closes at run time is still a circle."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("agent", "ctl", "drivers")
MAX_LINES = 600
FEATURES = ("agent.audio", "agent.board", "agent.schedule", "agent.health")


def _modules() -> dict[str, Path]:
    found = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The project module ``name`` refers to: itself, or the package that holds it."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str, path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for name in names:
            target = _resolve(name)
            if target is not None and target != module:
                out.add(target)
    return out


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_the_walker_sees_imports_and_finds_a_circle():
    assert "agent.core.loop" in GRAPH["agent.app"]
    assert "agent.protocol" in GRAPH["ctl.main"]
    assert "agent.audio.service" in GRAPH["agent.app"]  # `from agent.audio import service`
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle():
    assert _cycles(GRAPH) == []


def test_layers():
    wrong = []
    for module, targets in GRAPH.items():
        for target in targets:
            if _under(module, "drivers") and not _under(target, "drivers"):
                wrong.append(f"{module} -> {target} (drivers/ is the bottom layer)")
            if _under(module, "agent") and _under(target, "ctl"):
                wrong.append(f"{module} -> {target} (the daemon never imports the controller)")
            if _under(module, "agent.core") and any(_under(target, f) for f in FEATURES):
                wrong.append(f"{module} -> {target} (the core is below the services)")
    assert wrong == []


def test_no_module_over_600_lines():
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}
