"""The import structure DESIGN.md promises: one package, its components importing only down
the layers, and no import cycles between modules (a lazy import inside a function counts too)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "pdserve"
# Lower layers never import higher ones; a component may import its own layer's others only
# where listed. The modules at the package's top (the CLI, the local cluster, the client) sit
# above every component but `bench`, a program that runs clusters (`pdserve bench` runs it as
# one: `python -m pdserve.bench.serving`, not an import).
LAYER = {"kernels": 0, "engine": 1, "protos": 1, "kv_transfer": 2, "service": 3,
         "router": 4, "prefill_node": 4, "decode_node": 4, "": 5, "bench": 6}
COMPONENTS = [name for name in LAYER if name]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """The pdserve modules a file imports (relative imports resolved; `from x import y` counts
    x.y when y is a module)."""
    name, found = module_name(path), set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m.startswith("pdserve")}


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in imports_of(path) if m in files and m != name}
            for name, path in files.items()}


def component(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in COMPONENTS) else ""


def test_components_import_only_down_the_layers():
    wrong = [f"{a} imports {b}" for a, targets in import_graph().items() for b in targets
             if component(a) != component(b) and LAYER[component(b)] >= LAYER[component(a)]]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    graph, state, cycles = import_graph(), {}, []

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(cycles)


def test_only_pdserve_is_a_top_level_package():
    top = sorted(p.name for p in ROOT.iterdir() if (p / "__init__.py").exists())
    assert top == ["pdserve", "tests"]
