"""The package's layers: a lower layer never imports a higher one (imports inside functions
included), and no module of the package is imported in a cycle."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "deepclean"

#: unit -> layer; a unit is a top-level module or a sub-package of deepclean
LAYERS = {
    "_version": 0, "errors": 0, "progress": 0, "_compat": 0, "_torch": 0, "_digest": 0,
    "validation": 1, "distributed": 1, "checkpoint": 1, "precision": 1, "reproducibility": 1,
    "data": 2,
    "training": 3, "selection": 3, "masking": 3, "fisher": 3,
    "evaluation": 4,
    "methods": 5,
    "report": 6,
    "harness": 7,
    "deletion": 8,
    "cli": 9, "__main__": 9, "__init__": 9,
}


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("deepclean")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.startswith("deepclean"):
            if node.module == "deepclean":
                out |= {f"deepclean.{a.name}" for a in node.names}
            else:
                out.add(node.module)
    return out


def _modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC.parent).with_suffix("")
        name = ".".join(rel.parts)
        out[name.removesuffix(".__init__")] = path
    return out


def test_every_unit_has_a_layer():
    units = {_unit(m) for m in _modules()}
    assert units <= set(LAYERS), sorted(units - set(LAYERS))


def test_lower_layers_never_import_higher_ones():
    bad = []
    for name, path in _modules().items():
        here = LAYERS[_unit(name)]
        for imported in _imports(path):
            there = LAYERS.get(_unit(imported))
            if there is not None and there > here and _unit(name) != "__init__":
                bad.append(f"{name} (layer {here}) imports {imported} (layer {there})")
    assert not bad, "\n".join(bad)


def test_no_import_cycle_between_units():
    graph: dict[str, set[str]] = {}
    for name, path in _modules().items():
        u = _unit(name)
        graph.setdefault(u, set()).update(_unit(i) for i in _imports(path) if _unit(i) != u)
    graph.pop("__init__", None)
    for g in graph.values():
        g.discard("__init__")
    seen, stack = set(), []

    def visit(u):
        if u in stack:
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(u):] + [u]))
        if u in seen:
            return
        stack.append(u)
        for v in sorted(graph.get(u, ())):
            visit(v)
        stack.pop()
        seen.add(u)

    for u in sorted(graph):
        visit(u)


def test_old_module_paths_import_the_moved_modules():
    import importlib

    from deepclean._compat import MOVED

    for old, new in MOVED.items():
        assert importlib.import_module(old) is importlib.import_module(new), old
