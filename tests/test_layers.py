"""The import graph of seqgen_fast/: arrows point down the layers only, and there are no circles.

Every import of every module counts, those inside functions too. The layers, bottom up (DESIGN.md):

    0  _families _lazy _contract       data: the family manifest, lazy exports, contract constants
       _debug                          the debug_checks() switch
    1  _ext                            the compiled extension, if built
    2  _backend                        backends, dispatch, capabilities
    3  reference kernels               ground truth; Triton kernels and _C launchers (never each other)
    4  ops                             torch.library ops, autograd, dispatch, the backend-neutral loops
    5  nn diffusion functional         public modules and functions
    6  integrations checks bench       the top floor: may import anything below
    7  cli                             (8: ``__main__``, which runs it)

A module may import its own component (``ops.lstm`` -> ``ops._recurrence``) and any lower layer,
never a higher layer or another component of its own layer.
"""
import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parent.parent / "seqgen_fast"
LAYERS = {
    "_families": 0, "_lazy": 0, "_contract": 0, "_debug": 0,
    "_ext": 1,
    "_backend": 2,
    "reference": 3, "kernels": 3,
    "ops": 4,
    "nn": 5, "diffusion": 5, "functional": 5,
    "integrations": 6, "checks": 6, "bench": 6,
    "cli": 7, "__main__": 8,
}
EXTENSION = "seqgen_fast._C"  # the compiled module (csrc/), below every layer


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(dotted: str) -> bool:
    rel = pathlib.Path(*dotted.split(".")[1:])
    return (PKG / rel).with_suffix(".py").exists() or (PKG / rel / "__init__.py").exists()


def _imports(path: pathlib.Path) -> set[str]:
    """The seqgen_fast modules ``path`` imports (``from .. import x`` resolved to ``x`` when x is a module)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "seqgen_fast"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "seqgen_fast":
                continue
            names = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" != EXTENSION]
            if not names:
                continue
            subs = [n for n in names if _is_module(n)]
            out |= set(subs) if subs else {target}
    return out - {name}


GRAPH = {_module_name(p): _imports(p) for p in sorted(PKG.rglob("*.py"))}


def _component(module: str) -> str | None:
    """The layer component of a module (``seqgen_fast.ops.lstm`` -> ``ops``); None for the package face."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_every_component_has_a_layer():
    missing = {_component(m) for m in GRAPH} - set(LAYERS) - {None}
    assert not missing, f"give these a layer in LAYERS (and DESIGN.md): {sorted(missing)}"


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if _component(m)))
def test_imports_point_down(module):
    mine = _component(module)
    wrong = []
    for target in sorted(GRAPH[module]):
        theirs = _component(target)
        if theirs is None or theirs == mine:
            continue
        if LAYERS[theirs] >= LAYERS[mine]:
            wrong.append(f"{target} (layer {LAYERS[theirs]} {theirs})")
    assert not wrong, f"{module} (layer {LAYERS[mine]} {mine}) imports up or sideways: {wrong}"


def test_no_import_circles():
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str):
        state[m] = 1
        path.append(m)
        for t in sorted(GRAPH.get(m, ())):
            if t not in GRAPH:
                continue
            if state.get(t) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(t):] + [t]))
            if t not in state:
                visit(t)
        path.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)
